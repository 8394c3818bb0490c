/*
 * Shared by the libFuzzer harnesses (fuzz/ring_fuzz.c, fuzz/offload_fuzz.c): reading the fuzzer's
 * bytes, checks that abort with a message, and plausible frames.
 *
 * Each harness is one C file compiled together with the project's own
 * sources (tools/fuzz.py builds them with clang -fsanitize=fuzzer,address,
 * undefined).  A failed invariant calls abort(), which libFuzzer reports as
 * a crash with the input that caused it.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vswitch.h"

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "INVARIANT FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
            abort();                                                            \
        }                                                                       \
    } while (0)

/* The fuzzer's bytes, then a generator seeded from them once they run out,
 * so that a short input still describes a whole ring deterministically. */
struct input {
    const uint8_t *p;
    size_t n;
    uint64_t rng;
};

static inline void input_init(struct input *in, const uint8_t *data, size_t size)
{
    in->p = data;
    in->n = size;
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ size;
    for (size_t i = 0; i < size; i++) {
        h = (h ^ data[i]) * 0x100000001b3ULL;
    }
    in->rng = h | 1;
}

static inline uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static inline uint8_t in_u8(struct input *in)
{
    if (in->n) {
        in->n--;
        return *in->p++;
    }
    return (uint8_t)rng_next(&in->rng);
}

static inline uint16_t in_u16(struct input *in)
{
    return (uint16_t)(in_u8(in) | in_u8(in) << 8);
}

static inline uint32_t in_u32(struct input *in)
{
    return in_u16(in) | (uint32_t)in_u16(in) << 16;
}

static inline uint64_t in_u64(struct input *in)
{
    return in_u32(in) | (uint64_t)in_u32(in) << 32;
}

/* Ones' complement sum of a byte string (RFC 1071), big-endian words. */
static inline uint32_t ref_sum(uint32_t sum, const uint8_t *p, uint32_t len, uint32_t *odd)
{
    for (uint32_t i = 0; i < len; i++, (*odd) ^= 1) {
        sum += *odd ? p[i] : (uint32_t)p[i] << 8;
    }
    while (sum >> 16) {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    return sum;
}

/*
 * Writes a plausible start of a frame at p (room for len bytes): Ethernet
 * with maybe a VLAN tag, IPv4 or IPv6 (or something else), TCP, then bytes
 * from the input; the knobs come from the input, so the fuzzer can both hit
 * the parsers' happy paths and break each field.
 */
static inline uint32_t write_frame(struct input *in, uint8_t *p, uint32_t len)
{
    uint8_t knobs = in_u8(in);
    uint32_t off = 0;
    for (uint32_t i = 0; i < len; i++) {
        p[i] = in_u8(in);
    }
    if (len < 80 || (knobs & 0xc0) == 0xc0) {
        return 0;                       /* raw bytes */
    }
    p[0] &= 0xfe;                       /* unicast destination */
    off = 12;
    if (knobs & 1) {                    /* 802.1Q tag */
        p[off] = 0x81, p[off + 1] = 0x00;
        off += 4;
    }
    bool v6 = knobs & 2;
    p[off] = v6 ? 0x86 : 0x08, p[off + 1] = v6 ? 0xdd : 0x00;
    off += 2;
    uint32_t l3 = off;
    if (v6) {
        p[l3] = 0x60;
        p[l3 + 6] = (knobs & 4) ? p[l3 + 6] : 6;
        off += 40;
    } else {
        p[l3] = (knobs & 4) ? p[l3] : 0x45;
        p[l3 + 9] = (knobs & 8) ? p[l3 + 9] : 6;
        off += (p[l3] & 15) * 4u;
    }
    if (off + 20 <= len && !(knobs & 16)) {
        p[off + 12] = 0x50;             /* TCP header without options */
    }
    return l3;
}

#endif
