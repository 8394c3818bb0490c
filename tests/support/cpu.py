"""What this host's CPU offers, as /proc/cpuinfo lists it."""


def cpu_has(flag: str) -> bool:
    """True if the CPU lists `flag` (e.g. "aes"), as the C code's __builtin_cpu_supports would find it."""
    with open("/proc/cpuinfo") as f:
        return flag in f.read().split()
