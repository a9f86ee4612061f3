/* The int8 codec's kernels, one pass over memory each (easgd.compress).
 *
 * encode: for each chunk of 256 float32 values, m = max |v| (as the largest of the values'
 * bit patterns without their sign: the same order for non-negative floats, and a NaN's
 * pattern is above infinity's, so a NaN propagates as torch.amax's does), scale = m / 127,
 * q = round half to even of v * (127 * (1 / m)), and q = 0 where that factor is not finite
 * or is 0 (all-zero chunks, a max so small that 127 / max overflows, NaN and infinite ones).
 * decode: v = float(q) * scale. feedback: the error feedback around the two, as
 * easgd.algorithms.compress_with_feedback_ writes it in eager PyTorch (residual += v; encode
 * the residual; v = its decoded values; residual -= v). Each is the eager code's arithmetic,
 * operation for operation in IEEE float32 (no -ffast-math, no contraction into FMA), so the
 * bytes and values are bitwise the same; tests/test_compress.py holds them against each
 * other.
 *
 * Each chunk is read from memory once and worked on in L1. Outputs larger than the L2 cache
 * are written with streaming stores on x86-64 (no read for ownership of lines that are only
 * written): the round trip then moves about 50 MB for 5M values, where a copy moves 40 MB.
 *
 * The module takes addresses (Tensor.data_ptr()) of contiguous CPU buffers that
 * easgd.compress has checked, and releases the GIL while it runs (server sessions and the
 * overlapped worker encode in their own threads). On x86-64 Linux each kernel is compiled for
 * AVX-512, AVX2, SSE4.1 and the baseline, and the loader picks the best the CPU has.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 256
/* Outputs of at least this many chunks (1M values) are streamed past the caches. */
#define STREAM_CHUNKS 4096

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CAN_STREAM(p) (((uintptr_t)(p) & 15) == 0)
#define STREAM_BYTES(dst, src) \
    for (int i_ = 0; i_ < CHUNK; i_ += 16) \
        _mm_stream_si128((__m128i *)((dst) + i_), _mm_load_si128((const __m128i *)((src) + i_)))
#define STREAM_FLOATS(dst, src) \
    for (int i_ = 0; i_ < CHUNK; i_ += 4) _mm_stream_ps((dst) + i_, _mm_load_ps((src) + i_))
#define STREAM_END() _mm_sfence()
#else
#define CAN_STREAM(p) 0
#define STREAM_BYTES(dst, src) memcpy((dst), (src), CHUNK)
#define STREAM_FLOATS(dst, src) memcpy((dst), (src), CHUNK * sizeof(float))
#define STREAM_END() ((void)0)
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "sse4.1", "default")))
#else
#define CLONES
#endif

/* One chunk of CHUNK values r: its scale (returned) and its int8 values into o. */
static inline __attribute__((always_inline)) float encode_chunk(const float *restrict r,
                                                                 int8_t *restrict o) {
    uint32_t top = 0;
    for (int i = 0; i < CHUNK; i++) {
        uint32_t bits;
        memcpy(&bits, &r[i], sizeof bits);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float m;
    memcpy(&m, &top, sizeof m);
    float inv = 127.0f * (1.0f / m);
    if (isfinite(inv) && inv != 0.0f) {
        /* t = v * inv has |t| <= 127 (plus rounding); adding 1.5 * 2^23 rounds it to an
         * integer, half to even (as rintf in the default rounding mode), and leaves that
         * integer's two's complement in the low bits of the float's pattern. */
        for (int i = 0; i < CHUNK; i++) {
            float t = r[i] * inv + 12582912.0f;
            uint32_t bits;
            memcpy(&bits, &t, sizeof bits);
            o[i] = (int8_t)(uint8_t)bits;
        }
    } else { /* all-zero chunks, a max |v| so small that 127 / max overflows, NaN, inf */
        memset(o, 0, CHUNK);
    }
    return m / 127.0f;
}

CLONES static void encode_chunks(const float *restrict v, int64_t chunks,
                                 float *restrict scales, int8_t *restrict q) {
    const int stream = chunks >= STREAM_CHUNKS && CAN_STREAM(q);
    int8_t buf[CHUNK] __attribute__((aligned(64)));
    for (int64_t c = 0; c < chunks; c++) {
        int8_t *restrict o = stream ? buf : q + c * CHUNK;
        scales[c] = encode_chunk(v + c * CHUNK, o);
        if (stream) STREAM_BYTES(q + c * CHUNK, buf);
    }
    if (stream) STREAM_END();
}

/* Error feedback (easgd.algorithms.compress_with_feedback_), chunk by chunk in L1:
 * residual += v; (scales, q) = encode(residual); v = decode(scales, q); residual -= v. */
CLONES static void feedback_chunks(float *restrict v, float *restrict residual,
                                   int64_t chunks, float *restrict scales,
                                   int8_t *restrict q) {
    const int stream = chunks >= STREAM_CHUNKS && CAN_STREAM(q);
    float t[CHUNK] __attribute__((aligned(64)));
    int8_t buf[CHUNK] __attribute__((aligned(64)));
    for (int64_t c = 0; c < chunks; c++) {
        float *restrict vc = v + c * CHUNK;
        float *restrict rc = residual + c * CHUNK;
        int8_t *restrict o = stream ? buf : q + c * CHUNK;
        for (int i = 0; i < CHUNK; i++) t[i] = rc[i] + vc[i];
        const float s = encode_chunk(t, o);
        scales[c] = s;
        for (int i = 0; i < CHUNK; i++) {
            const float sent = (float)o[i] * s;
            vc[i] = sent;
            rc[i] = t[i] - sent;
        }
        if (stream) STREAM_BYTES(q + c * CHUNK, buf);
    }
    if (stream) STREAM_END();
}

CLONES static void decode_chunks(const float *restrict scales, const int8_t *restrict q,
                                 int64_t chunks, float *restrict out) {
    const int stream = chunks >= STREAM_CHUNKS && CAN_STREAM(out);
    float buf[CHUNK] __attribute__((aligned(64)));
    for (int64_t c = 0; c < chunks; c++) {
        const float s = scales[c];
        const int8_t *restrict r = q + c * CHUNK;
        float *restrict o = out + c * CHUNK;
        float *restrict w = stream ? buf : o;
        for (int i = 0; i < CHUNK; i++) w[i] = (float)r[i] * s;
        if (stream) STREAM_FLOATS(o, buf);
    }
    if (stream) STREAM_END();
}

static PyObject *encode(PyObject *self, PyObject *args) {
    unsigned long long v, scales, q;
    long long chunks;
    if (!PyArg_ParseTuple(args, "KLKK", &v, &chunks, &scales, &q)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    encode_chunks((const float *)(uintptr_t)v, chunks, (float *)(uintptr_t)scales,
                  (int8_t *)(uintptr_t)q);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    unsigned long long scales, q, out;
    long long chunks;
    if (!PyArg_ParseTuple(args, "KKLK", &scales, &q, &chunks, &out)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    decode_chunks((const float *)(uintptr_t)scales, (const int8_t *)(uintptr_t)q, chunks,
                  (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *feedback(PyObject *self, PyObject *args) {
    unsigned long long v, residual, scales, q;
    long long chunks;
    if (!PyArg_ParseTuple(args, "KKLKK", &v, &residual, &chunks, &scales, &q)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    feedback_chunks((float *)(uintptr_t)v, (float *)(uintptr_t)residual, chunks,
                    (float *)(uintptr_t)scales, (int8_t *)(uintptr_t)q);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(v, chunks, scales, q): addresses of float32 v, float32 scales, int8 q"},
    {"decode", decode, METH_VARARGS,
     "decode(scales, q, chunks, out): addresses of float32 scales, int8 q, float32 out"},
    {"feedback", feedback, METH_VARARGS,
     "feedback(v, residual, chunks, scales, q): addresses of float32 v and residual (both "
     "updated), float32 scales, int8 q"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "easgd._int8", "The int8 codec's fused kernels (easgd.compress).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__int8(void) { return PyModule_Create(&module); }
