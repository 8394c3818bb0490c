# Shared by the install and setup scripts (sourced, not run): quiet steps
# that show their output only when they fail. Set STEP_NAME before sourcing.

LOG=$(mktemp "/tmp/${STEP_NAME:-vswitch}.XXXXXX")
trap 'rm -f "$LOG"' EXIT

die() {
    echo "${STEP_NAME:-vswitch}: $*" >&2
    exit 1
}

# Runs a step with its output in $LOG; shows that output only if it fails.
run() {
    local what=$1
    shift
    if ! "$@" >"$LOG" 2>&1; then
        echo "${STEP_NAME:-vswitch}: $what failed: $*" >&2
        cat "$LOG" >&2
        exit 1
    fi
}
