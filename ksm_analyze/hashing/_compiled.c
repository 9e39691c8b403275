/* Compiled inner loops of stage 1 and stage 2, on pages in place (no gather, no per-page
 * Python). Optional: without a C compiler at install time the package uses its numpy code
 * (ksm_analyze/hashing/compiled.py says which one runs); both give the same results.
 *
 * Every function takes buffers (numpy arrays, memory maps) and checks every length and index
 * against them before it releases the GIL, so a caller's mistake is a ValueError, never a read
 * outside a buffer. Typed buffers (int64 rows, uint64 hashes, bool flags) are also checked for
 * their format, C contiguity, writability where written and alignment to their item size
 * (get_typed), so no load or store is ever misaligned: the wrappers in compiled.py allocate
 * them with numpy, always aligned, so the loops stay plain typed accesses. xxh3 comes from the vendored xxHash library (_vendor/xxhash, the same
 * code the `xxhash` Python package builds), so hashes are those of xxhash.xxh3_64_intdigest.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#define PROBE_BYTES 64 /* one cache line settles most pages as not zero */

/* Plain LZ77 (Hyper-V .vmrs pages): its own block at the end of the file. */
static PyObject *lz77_pages(PyObject *self, PyObject *args);
extern const char lz77_pages_doc[];

static int
is_zero(const unsigned char *page, Py_ssize_t size)
{
    Py_ssize_t probe = size < PROBE_BYTES ? size : PROBE_BYTES;
    unsigned char any = 0;
    for (Py_ssize_t i = 0; i < probe; i++)
        any |= page[i];
    if (any)
        return 0;
    /* All bytes equal to the first (zero): memcmp of the page with itself one byte on,
     * which libc runs with its vector loop. */
    return size <= probe || memcmp(page, page + 1, (size_t)size - 1) == 0;
}

/* Get obj's pages: a C-contiguous buffer of whole pages one after another, or a 2-D buffer
 * of bytes (numpy's (n, page_size) view) whose rows are contiguous and a constant pitch of at
 * least a page apart (a migration stream's pages, each behind its record header). Sets the
 * page count and the pitch; anything else is a ValueError naming `what`. */
static int
get_pages(PyObject *obj, Py_buffer *view, Py_ssize_t page_size, const char *what,
          Py_ssize_t *count, Py_ssize_t *pitch)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES) < 0)
        return -1;
    if (page_size <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: page size %zd", what, page_size);
        goto fail;
    }
    if (view->ndim == 2 && view->itemsize == 1 && view->shape[1] == page_size
        && view->strides[1] == 1 && (view->shape[0] <= 1 || view->strides[0] >= page_size)) {
        *count = view->shape[0];
        *pitch = view->shape[0] <= 1 ? page_size : view->strides[0];
        return 0;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: not C-contiguous, nor rows of %zd bytes at a "
                     "constant pitch", what, page_size);
        goto fail;
    }
    if (view->len % page_size != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte pages",
                     what, view->len, page_size);
        goto fail;
    }
    *count = view->len / page_size;
    *pitch = page_size;
    return 0;
fail:
    PyBuffer_Release(view);
    view->obj = NULL;
    return -1;
}

/* Get obj's buffer as a typed array: C-contiguous, writable if `writable`, of a one-character
 * struct format among `codes` (native byte order) with `itemsize`-byte items, its start aligned
 * to `itemsize`. Anything else is a ValueError naming `what`; a non-buffer stays a TypeError. */
static int
get_typed(PyObject *obj, Py_buffer *view, const char *codes, Py_ssize_t itemsize, int writable,
          const char *what)
{
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        /* numpy says ValueError, bytes and memoryview BufferError: one ValueError naming it */
        if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
#if PY_VERSION_HEX >= 0x030C0000
            PyObject *exc = PyErr_GetRaisedException();
#else
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
#endif
            PyErr_Format(PyExc_ValueError, "%s: not a %sC-contiguous buffer (%S)", what,
                         writable ? "writable " : "", exc);
            Py_XDECREF(exc);
        }
        return -1;
    }
    const char *format = view->format != NULL ? view->format : "B";
#if PY_BIG_ENDIAN
    if (*format == '@' || *format == '=' || *format == '>' || *format == '!')
#else
    if (*format == '@' || *format == '=' || *format == '<')
#endif
        format++;
    if (format[0] == '\0' || format[1] != '\0' || strchr(codes, format[0]) == NULL
        || view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: an array of %zd-byte items of format '%s' is "
                     "needed, not format '%s'", what, itemsize, codes,
                     view->format != NULL ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    if ((uintptr_t)view->buf % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: not aligned to %zd bytes (starts at %p)", what,
                     itemsize, view->buf);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define INT64_CODES "ql" /* int64: numpy's int64 is 'l' where long has 8 bytes, else 'q' */
#define UINT64_CODES "QL"

static int
check_rows(Py_buffer *rows, Py_ssize_t limit, const char *what, Py_ssize_t *count)
{
    *count = rows->len / 8; /* an int64 buffer from get_typed */
    const int64_t *r = rows->buf;
    for (Py_ssize_t i = 0; i < *count; i++) {
        if (r[i] < 0 || r[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %lld is outside 0..%zd", what, i,
                         (long long)r[i], limit - 1);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(prefix_hashes_doc,
"prefix_hashes(pages, page_size, nbytes, skip, out)\n\n"
"For each page of ``pages`` (contiguous whole pages, or rows of a page at a constant pitch):\n"
"out[i] = 0 if the page is\n"
"all zero (or skip[i] is true: a page the format records as zero), else xxh3-64 of its first\n"
"``nbytes`` bytes, with 1 standing for a hash of 0. ``skip`` is a bool buffer or None;\n"
"``out`` a writable uint64 buffer with one entry per page. Every typed buffer (here and in\n"
"the other functions) must be C-contiguous, of its type and aligned to its item size.");

static PyObject *
prefix_hashes(PyObject *self, PyObject *args)
{
    Py_buffer pages = {0}, out = {0}, skip = {0};
    Py_ssize_t page_size, nbytes, n, pitch;
    PyObject *pages_obj, *skip_obj, *out_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "OnnOO", &pages_obj, &page_size, &nbytes, &skip_obj, &out_obj))
        return NULL;
    if (get_pages(pages_obj, &pages, page_size, "pages", &n, &pitch) < 0
        || get_typed(out_obj, &out, UINT64_CODES, 8, 1, "out") < 0
        || (skip_obj != Py_None && get_typed(skip_obj, &skip, "?", 1, 0, "skip") < 0))
        goto done;
    if (nbytes <= 0 || nbytes > page_size) {
        PyErr_Format(PyExc_ValueError, "nbytes %zd is outside 1..%zd", nbytes, page_size);
        goto done;
    }
    if (out.len != n * 8 || (skip.buf != NULL && skip.len != n)) {
        PyErr_SetString(PyExc_ValueError, "out (uint64) and skip (bool) need one entry a page");
        goto done;
    }
    const unsigned char *base = pages.buf, *skipped = skip.buf;
    uint64_t *hashes = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *page = base + i * pitch;
        if ((skipped != NULL && skipped[i]) || is_zero(page, page_size)) {
            hashes[i] = 0;
        } else {
            uint64_t h = XXH3_64bits(page, (size_t)nbytes);
            hashes[i] = h ? h : 1;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&skip); /* each does nothing for a buffer never taken (obj NULL) */
    PyBuffer_Release(&pages);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(equal_rows_doc,
"equal_rows(pages, page_size, rows, reps, keys, out)\n\n"
"out[i] = page rows[i] of ``pages`` has the same bytes as page keys[i] of ``reps`` (pages as\n"
"for prefix_hashes, reps contiguous; rows and keys int64 buffers; out a writable bool buffer).");

static PyObject *
equal_rows(PyObject *self, PyObject *args)
{
    Py_buffer pages = {0}, reps = {0}, rows = {0}, keys = {0}, out = {0};
    Py_ssize_t page_size, n, nkeys, npages, nreps, pitch, reps_pitch;
    PyObject *pages_obj, *reps_obj, *rows_obj, *keys_obj, *out_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "OnOOOO", &pages_obj, &page_size, &rows_obj, &reps_obj,
                          &keys_obj, &out_obj))
        return NULL;
    if (get_pages(pages_obj, &pages, page_size, "pages", &npages, &pitch) < 0
        || get_pages(reps_obj, &reps, page_size, "reps", &nreps, &reps_pitch) < 0
        || get_typed(rows_obj, &rows, INT64_CODES, 8, 0, "rows") < 0
        || get_typed(keys_obj, &keys, INT64_CODES, 8, 0, "keys") < 0
        || get_typed(out_obj, &out, "?", 1, 1, "out") < 0
        || check_rows(&rows, npages, "rows", &n) < 0
        || check_rows(&keys, nreps, "keys", &nkeys) < 0)
        goto done;
    if (nkeys != n || out.len != n) {
        PyErr_SetString(PyExc_ValueError, "rows, keys and out need the same length");
        goto done;
    }
    const unsigned char *base = pages.buf, *firsts = reps.buf;
    const int64_t *row = rows.buf, *key = keys.buf;
    unsigned char *equal = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        equal[i] = memcmp(base + row[i] * pitch, firsts + key[i] * reps_pitch,
                          (size_t)page_size) == 0;
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&pages);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&reps);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(page_hashes_doc,
"page_hashes(pages, page_size, rows, out)\n\n"
"out[i] = xxh3-64 of the whole page rows[i] of ``pages`` (pages as for prefix_hashes; out a\n"
"writable uint64 buffer).");

static PyObject *
page_hashes(PyObject *self, PyObject *args)
{
    Py_buffer pages = {0}, rows = {0}, out = {0};
    Py_ssize_t page_size, n, npages, pitch;
    PyObject *pages_obj, *rows_obj, *out_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "OnOO", &pages_obj, &page_size, &rows_obj, &out_obj))
        return NULL;
    if (get_pages(pages_obj, &pages, page_size, "pages", &npages, &pitch) < 0
        || get_typed(rows_obj, &rows, INT64_CODES, 8, 0, "rows") < 0
        || get_typed(out_obj, &out, UINT64_CODES, 8, 1, "out") < 0
        || check_rows(&rows, npages, "rows", &n) < 0)
        goto done;
    if (out.len != n * 8) {
        PyErr_SetString(PyExc_ValueError, "out (uint64) needs one entry a row");
        goto done;
    }
    const unsigned char *base = pages.buf;
    const int64_t *row = rows.buf;
    uint64_t *hashes = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        hashes[i] = XXH3_64bits(base + row[i] * pitch, (size_t)page_size);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&pages);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(qevm_ram_records_doc,
"qevm_ram_records(buf, pos, page_size, length, where, base=0) -> (pos, count)\n\n"
"Index the RAM records of a QEMU migration stream (migration/ram.c) from offset ``pos`` of\n"
"``buf``: while the record there is a be64 (offset in the block | flags) with the flags\n"
"PAGE|CONTINUE (0x28: the page follows) or ZERO|CONTINUE (0x22: one fill byte follows), an\n"
"offset that is a page of the current block (``length`` bytes) and all its bytes in ``buf``,\n"
"set where[offset / page_size] to the file offset of the page (``base`` + its offset in\n"
"``buf``: ``buf`` may be a window of a decompressed stream), or to -2 - fill byte, so the\n"
"last record of a page wins, and go on. Returns the offset of the first record not taken and\n"
"how many were taken; the caller parses that record itself (another kind, a bad offset, the\n"
"end of the buffer). ``where`` is a writable int64 buffer of at least length / page_size\n"
"entries; page_size a power of two of at least 1 KiB (the flags sit below 0x400).");

static PyObject *
qevm_ram_records(PyObject *self, PyObject *args)
{
    Py_buffer buf, where = {0};
    Py_ssize_t pos, page_size;
    long long length, base = 0;
    PyObject *where_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnLO|L", &buf, &pos, &page_size, &length, &where_obj,
                          &base))
        return NULL;
    if (get_typed(where_obj, &where, INT64_CODES, 8, 1, "where") < 0)
        goto done;
    if (page_size < 1024 || (page_size & (page_size - 1)) != 0 || pos < 0 || pos > buf.len
        || length < 0 || length / page_size > where.len / 8 || base < 0
        || base > INT64_MAX - buf.len) {
        PyErr_Format(PyExc_ValueError, "qevm_ram_records: page size %zd, offset %zd of %zd "
                     "bytes, block of %lld bytes and %zd index entries do not fit", page_size,
                     pos, buf.len, length, where.len / 8);
        goto done;
    }
    const unsigned char *b = buf.buf;
    int64_t *w = where.buf;
    const Py_ssize_t end = buf.len;
    const uint64_t limit = (uint64_t)length, pmask = (uint64_t)page_size - 1;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    while (end - pos >= 8) {
        const unsigned char *r = b + pos;
        uint64_t word = 0;
        for (int i = 0; i < 8; i++)
            word = (word << 8) | r[i];
        uint64_t flags = word & 0x3FF, addr = word & ~(uint64_t)0x3FF;
        if ((addr & pmask) != 0 || addr >= limit)
            break;
        if (flags == 0x28) { /* PAGE | CONTINUE */
            if (end - pos - 8 < page_size)
                break;
            w[addr / (uint64_t)page_size] = (int64_t)base + (int64_t)(pos + 8);
            pos += 8 + page_size;
        } else if (flags == 0x22) { /* ZERO | CONTINUE */
            if (end - pos - 8 < 1)
                break;
            w[addr / (uint64_t)page_size] = -2 - (int64_t)r[8];
            pos += 9;
        } else {
            break;
        }
        count++;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", pos, count);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&where);
    return result;
}

static PyMethodDef methods[] = {
    {"prefix_hashes", prefix_hashes, METH_VARARGS, prefix_hashes_doc},
    {"equal_rows", equal_rows, METH_VARARGS, equal_rows_doc},
    {"page_hashes", page_hashes, METH_VARARGS, page_hashes_doc},
    {"qevm_ram_records", qevm_ram_records, METH_VARARGS, qevm_ram_records_doc},
    {"lz77_pages", lz77_pages, METH_VARARGS, lz77_pages_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_compiled",
    .m_doc = "Stage 1 and stage 2 inner loops over pages in place (see ksm_analyze/hashing/compiled.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__compiled(void)
{
    return PyModule_Create(&module);
}

/* ---- Plain LZ77 ([MS-XCA] 2.4, Windows compression format 3): Hyper-V .vmrs pages --------
 * The same decoder as ksm_analyze/formats/lz77.py, step for step, so both accept and refuse
 * the same streams with the same messages (tests/test_vmrs.py checks they agree). Bounded:
 * it writes at most dst_len bytes at dst and reads only src[0..src_len). */

enum lz77_error {
    LZ77_OK, LZ77_FLAG_WORD, LZ77_LITERAL, LZ77_MATCH, LZ77_LENGTH, LZ77_SHORT, LZ77_BACK,
    LZ77_PAST, LZ77_DECODED,
};

typedef struct {
    enum lz77_error code;
    Py_ssize_t at;      /* the input byte the message names */
    uint64_t value;     /* the length, offset or bytes decoded it names */
} lz77_status;

static int
lz77_bit_length(uint32_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return x ? 32 - __builtin_clz(x) : 0;
#else
    int bits = 0;
    while (x) {
        bits++;
        x >>= 1;
    }
    return bits;
#endif
}

static void
lz77_one(const unsigned char *src, Py_ssize_t n, unsigned char *dst, Py_ssize_t dst_len,
         lz77_status *st)
{
    Py_ssize_t i = 0, o = 0, half = -1;
    uint32_t flags = 0;
    int nflags = 0;
    st->code = LZ77_OK;
    while (o < dst_len) {
        if (nflags == 0) {
            if (n - i < 4) {
                st->code = LZ77_FLAG_WORD, st->at = i;
                return;
            }
            flags = (uint32_t)src[i] | (uint32_t)src[i + 1] << 8 | (uint32_t)src[i + 2] << 16
                    | (uint32_t)src[i + 3] << 24;
            i += 4;
            nflags = 32;
        }
        /* clear bits before the next set one: a run of literals, copied at once */
        uint32_t rest = nflags == 32 ? flags : flags & (((uint32_t)1 << nflags) - 1);
        int literals = nflags - lz77_bit_length(rest);
        if (literals) {
            Py_ssize_t k = literals;
            if (k > n - i)
                k = n - i;
            if (k > dst_len - o)
                k = dst_len - o;
            if (k == 0) {
                st->code = LZ77_LITERAL, st->at = i;
                return;
            }
            memcpy(dst + o, src + i, (size_t)k);
            o += k, i += k;
            nflags -= (int)k;
            continue;
        }
        nflags--;
        if (i == n)
            break; /* a match flag with no input left: the end of the stream */
        if (n - i < 2) {
            st->code = LZ77_MATCH, st->at = i;
            return;
        }
        unsigned match = (unsigned)src[i] | (unsigned)src[i + 1] << 8;
        i += 2;
        uint64_t length = match & 7, offset = (match >> 3) + 1;
        if (length == 7) {
            if (half < 0) {
                if (i >= n) {
                    st->code = LZ77_LENGTH, st->at = i;
                    return;
                }
                length = src[i] & 0x0F;
                half = i++;
            } else {
                length = src[half] >> 4;
                half = -1;
            }
            if (length == 15) {
                if (i >= n) {
                    st->code = LZ77_LENGTH, st->at = i;
                    return;
                }
                length = src[i++];
                if (length == 255) {
                    if (n - i < 2) {
                        st->code = LZ77_LENGTH, st->at = i;
                        return;
                    }
                    length = (uint64_t)src[i] | (uint64_t)src[i + 1] << 8;
                    i += 2;
                    if (length == 0) {
                        if (n - i < 4) {
                            st->code = LZ77_LENGTH, st->at = i;
                            return;
                        }
                        length = (uint64_t)src[i] | (uint64_t)src[i + 1] << 8
                                 | (uint64_t)src[i + 2] << 16 | (uint64_t)src[i + 3] << 24;
                        i += 4;
                    }
                    if (length < 15 + 7) {
                        st->code = LZ77_SHORT, st->at = i, st->value = length;
                        return;
                    }
                    length -= 15 + 7;
                }
                length += 15;
            }
            length += 7;
        }
        length += 3;
        if (offset > (uint64_t)o) {
            st->code = LZ77_BACK, st->at = i, st->value = offset;
            return;
        }
        if (length > (uint64_t)(dst_len - o)) {
            st->code = LZ77_PAST, st->at = i;
            return;
        }
        unsigned char *to = dst + o;
        const unsigned char *from = to - offset;
        if (offset >= length) {
            memcpy(to, from, (size_t)length);
        } else if (offset == 1) {
            memset(to, *from, (size_t)length);
        } else { /* overlapping: the offset bytes before repeat; copy them, then double */
            size_t done = (size_t)offset;
            memcpy(to, from, done);
            while (done < length) {
                size_t k = length - done < done ? (size_t)length - done : done;
                memcpy(to + done, to, k); /* to[0..done) is whole periods of the pattern */
                done += k;
            }
        }
        o += (Py_ssize_t)length;
    }
    if (o != dst_len)
        st->code = LZ77_DECODED, st->at = i, st->value = (uint64_t)o;
}

static PyObject *
lz77_message(const lz77_status *st, Py_ssize_t dst_len)
{
    long long at = (long long)st->at;
    unsigned long long v = (unsigned long long)st->value;
    switch (st->code) {
    case LZ77_FLAG_WORD:
        return PyUnicode_FromFormat("the flag word at byte %lld runs past the end", at);
    case LZ77_LITERAL:
        return PyUnicode_FromFormat("a literal at byte %lld runs past the end", at);
    case LZ77_MATCH:
        return PyUnicode_FromFormat("the match at byte %lld runs past the end", at);
    case LZ77_LENGTH:
        return PyUnicode_FromFormat("the match length at byte %lld runs past the end", at);
    case LZ77_SHORT:
        return PyUnicode_FromFormat("match length %llu at byte %lld is too short", v, at);
    case LZ77_BACK:
        return PyUnicode_FromFormat("the match at byte %lld reaches %llu bytes back, before the "
                                    "start of the output", at, v);
    case LZ77_PAST:
        return PyUnicode_FromFormat("the match at byte %lld writes past the %zd bytes expected",
                                    at, dst_len);
    default:
        return PyUnicode_FromFormat("decoded %llu bytes, not %zd", v, dst_len);
    }
}

const char lz77_pages_doc[] = PyDoc_STR(
"lz77_pages(src, jobs, out) -> None or (job, message)\n\n"
"Decode plain LZ77 streams ([MS-XCA] 2.4) of ``src`` into ``out`` (a writable buffer), one\n"
"per row of ``jobs`` (int64, C-contiguous, rows of src_offset, src_length, out_offset,\n"
"out_length, each inside its buffer), in order, without the GIL. Each stream must decode to\n"
"exactly its out_length bytes (it writes no more); at the first that does not, returns its\n"
"row and the message ksm_analyze/formats/lz77.py gives for it (``out`` then holds what was\n"
"decoded so far). A row outside the buffers is a ValueError.");

static PyObject *
lz77_pages(PyObject *self, PyObject *args)
{
    Py_buffer src, out = {0}, jobs = {0};
    PyObject *jobs_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*Ow*", &src, &jobs_obj, &out))
        return NULL;
    if (get_typed(jobs_obj, &jobs, INT64_CODES, 8, 0, "jobs") < 0)
        goto done;
    if (jobs.len % 32 != 0) {
        PyErr_SetString(PyExc_ValueError, "jobs: rows of 4 int64 are needed");
        goto done;
    }
    const int64_t *job = jobs.buf;
    const Py_ssize_t njobs = jobs.len / 32;
    for (Py_ssize_t k = 0; k < njobs; k++) {
        const int64_t *j = job + 4 * k;
        if (j[0] < 0 || j[1] < 0 || j[0] > src.len || j[1] > src.len - j[0]
            || j[2] < 0 || j[3] < 0 || j[2] > out.len || j[3] > out.len - j[2]) {
            PyErr_Format(PyExc_ValueError, "lz77_pages: job %zd (%lld, %lld, %lld, %lld) is "
                         "outside the %zd-byte source or the %zd-byte output", k,
                         (long long)j[0], (long long)j[1], (long long)j[2], (long long)j[3],
                         src.len, out.len);
            goto done;
        }
    }
    const unsigned char *s = src.buf;
    unsigned char *d = out.buf;
    lz77_status st = {LZ77_OK, 0, 0};
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < njobs; k++) {
        const int64_t *j = job + 4 * k;
        lz77_one(s + j[0], (Py_ssize_t)j[1], d + j[2], (Py_ssize_t)j[3], &st);
        if (st.code != LZ77_OK) {
            failed = k;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed < 0) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *message = lz77_message(&st, (Py_ssize_t)job[4 * failed + 3]);
        if (message != NULL)
            result = Py_BuildValue("nN", failed, message);
    }
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&jobs);
    PyBuffer_Release(&out);
    return result;
}
