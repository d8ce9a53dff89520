/*
 * statecast._speedups: C versions of the loops that ingest and a snapshot run once
 * per change or per record.
 *
 * Why C, and why here: after every whole-batch trick CPython offers (docs/performance.md,
 * "In-memory ingest: where the time goes per change"), ingest was bound by one Python
 * loop iteration per change in each of these steps: checking a value is canonical (§9),
 * spelling its key as JSON, building its record frame (§4.1) and its Record, installing
 * it. No library does this job: it is statecast's own frame layout, state layout and §9
 * rules. Each function here is the exact twin of Python code that stays the reference
 * and the fallback:
 *
 *   prepare_plain    <-> statecast.core.protocol._prepare_request (its fast path)
 *   encode_records   <-> statecast.core.state.encode_batch_py
 *   install_upserts  <-> the loop of statecast.core.state.State.install (upserts, no
 *                        snapshot open)
 *   join_lines       <-> Snapshot.read + b"".join (Snapshot.read_joined)
 *
 * Each accepts only what it can do exactly as Python does, and hands the rest back
 * (None, or how far it got): prepare_plain takes the common case only (every change an
 * upsert of a known collection, every key printable ASCII, every value canonical as
 * sent), so the Python code, with its error messages, decides every other case.
 * tests/core/test_speedups.py and tests/core/test_state.py hold each to its twin.
 *
 * Python code may run inside some loops here (a property, collection_type()): those
 * walk a tuple copy of their list (join_lines runs none). The type caches hold strong
 * references.
 *
 * Without a compiler the package installs without this module and runs the Python code
 * (statecast.core.accel); STATECAST_NO_SPEEDUPS=1 makes it do so on purpose.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/* §9, per value byte: 1 = plain (printable ASCII "!" to DEL but for the three below),
 * 2 = an opening bracket (counted against MAX_DEPTH), 0 = anything else (whitespace,
 * controls, the backslash, non-ASCII): not canonical as sent, left to Python. */
static unsigned char value_class[256];
/* Digits and signs: the bytes values.py's _TO_ZERO maps to "0" (a run of 210 of them,
 * or three after an "e"/"E", may be a number out of range: left to Python). */
static unsigned char numeric[256];
/* Key characters whose JSON spelling is the character itself (what msgspec writes):
 * " " to DEL but the quote and the backslash. */
static unsigned char key_plain[128];

#define LONG_RUN 210

/* -- reading a msgspec Struct's fields -------------------------------------------
 * A Struct's fields are member descriptors (slots at fixed offsets). Reading the slot
 * directly costs a load instead of a generic attribute lookup; a type whose fields are
 * anything else is read with PyObject_GetAttr. Returns a new reference, or NULL with an
 * exception set. */
typedef struct {
    PyTypeObject *type; /* a strong reference: compared by identity, so it must not die */
    Py_ssize_t offset[4]; /* collection, key, value, delete; -1: use getattr */
} FieldMap;

static PyObject *field_names[4];
static FieldMap change_fields = {NULL, {-1, -1, -1, -1}};

static void
map_fields(PyTypeObject *type)
{
    Py_INCREF(type);
    Py_XSETREF(change_fields.type, type);
    for (int i = 0; i < 4; i++) {
        change_fields.offset[i] = -1;
        PyObject *descr = _PyType_Lookup(type, field_names[i]); /* borrowed */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
            if ((m->type == T_OBJECT_EX || m->type == T_OBJECT))
                change_fields.offset[i] = m->offset;
        }
    }
}

static inline PyObject *
get_field(PyObject *obj, int i)
{
    Py_ssize_t off = change_fields.offset[i];
    if (off >= 0) {
        PyObject *v = *(PyObject **)((char *)obj + off);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(obj, field_names[i]);
}

/* -- prepare_plain ------------------------------------------------------------------ */

/* Whether value bytes are canonical as sent (values.canonical_value's fast path, and
 * no suspicion of a huge number): 1 yes, 0 leave it to Python. The scalar loop; the
 * SSE2 version below runs it for the bytes after the last whole 64-byte block. `run`
 * is the length of the run of digits and signs that ends just before s[0], and
 * `before` how many bytes before s[0] belong to the value (0 at its start): only
 * those are read. */
static int
value_is_plain_scalar(const unsigned char *s, Py_ssize_t n, Py_ssize_t *openers,
                      Py_ssize_t max_depth, Py_ssize_t run, Py_ssize_t before)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        unsigned char k = value_class[c];
        if (k != 1) {
            if (k == 0 || ++*openers > max_depth)
                return 0;
        }
        if (numeric[c]) {
            run++;
            if (run >= LONG_RUN)
                return 0;
            if (run == 3 && i - 3 >= -before && (s[i - 3] | 0x20) == 'e')
                return 0;
        }
        else {
            run = 0;
        }
    }
    return 1;
}

#if defined(__SSE2__)
#include <emmintrin.h>

/* One 16-byte vector's masks (bit i: byte i). */
static inline void
classify16(const unsigned char *p, unsigned *bad, unsigned *open, unsigned *num, unsigned *e)
{
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    /* Signed compares: bytes >= 0x80 are negative, so "less than '!'" also catches them. */
    __m128i b = _mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x21)),
                             _mm_cmpeq_epi8(v, _mm_set1_epi8('\\')));
    __m128i o = _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('[')),
                             _mm_cmpeq_epi8(v, _mm_set1_epi8('{')));
    __m128i d = _mm_and_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8('0' - 1)),
                              _mm_cmplt_epi8(v, _mm_set1_epi8('9' + 1)));
    d = _mm_or_si128(d, _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('+')),
                                     _mm_cmpeq_epi8(v, _mm_set1_epi8('-'))));
    __m128i x = _mm_cmpeq_epi8(_mm_or_si128(v, _mm_set1_epi8(0x20)), _mm_set1_epi8('e'));
    *bad = (unsigned)_mm_movemask_epi8(b);
    *open = (unsigned)_mm_movemask_epi8(o);
    *num = (unsigned)_mm_movemask_epi8(d);
    *e = (unsigned)_mm_movemask_epi8(x);
}

/* value_is_plain_scalar's test, 64 bytes at a time: a mask per byte class, then
 * the same three rules on the masks (a bad byte; too many opening brackets; an "e"
 * or "E" followed by three digits or signs, or a run of LONG_RUN of them). */
static int
value_is_plain(const unsigned char *s, Py_ssize_t n, Py_ssize_t max_depth)
{
    Py_ssize_t openers = 0, run = 0, i = 0;
    uint64_t carry_e = 0; /* the previous block's E & N>>1 & N>>2 bits 61..63 */
    if (n == 0)
        return 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t bad = 0, open = 0, num = 0, e = 0;
        for (int j = 0; j < 4; j++) {
            unsigned b, o, d, x;
            classify16(s + i + 16 * j, &b, &o, &d, &x);
            bad |= (uint64_t)b << (16 * j);
            open |= (uint64_t)o << (16 * j);
            num |= (uint64_t)d << (16 * j);
            e |= (uint64_t)x << (16 * j);
        }
        if (bad)
            return 0;
        openers += __builtin_popcountll(open);
        if (openers > max_depth)
            return 0;
        /* "e" then three of N, within the block and across the boundary: bit k of
         * `hit` is an "e" at k whose next three bytes are N. */
        uint64_t hit = e & (num >> 1) & (num >> 2) & (num >> 3);
        /* An "e" at 61..63 of the previous block: its N bits that fall in this one. */
        if (carry_e) {
            /* carry_e bit 0: e at 61 with N at 62, 63 -> needs N at bit 0 here;
             * bit 1: e at 62 with N at 63 -> needs N at bits 0, 1;
             * bit 2: e at 63 -> needs N at bits 0, 1, 2. */
            if (((carry_e & 1) && (num & 1)) || ((carry_e & 2) && (num & 3) == 3)
                || ((carry_e & 4) && (num & 7) == 7))
                return 0;
        }
        if (hit & ((1ULL << 61) - 1))
            return 0;
        carry_e = ((e >> 61) & 1 & (num >> 62) & (num >> 63))
                  | (((e >> 62) & 1 & (num >> 63)) << 1) | (((e >> 63) & 1) << 2);
        /* Runs of N: the one that continues from the last block, then the one that
         * reaches this block's end. */
        if (num == ~0ULL) {
            run += 64;
            if (run >= LONG_RUN)
                return 0;
        }
        else {
            if (run + __builtin_ctzll(~num) >= LONG_RUN)
                return 0;
            run = __builtin_clzll(~num);
        }
    }
    /* The rest: the scalar loop carries the run, and it looks back at s[i-3] for
     * an "e" (which covers an "e" carried over from the last block). */
    return value_is_plain_scalar(s + i, n - i, &openers, max_depth, run, i);
}
#else
static int
value_is_plain(const unsigned char *s, Py_ssize_t n, Py_ssize_t max_depth)
{
    Py_ssize_t openers = 0;
    return n > 0 && value_is_plain_scalar(s, n, &openers, max_depth, 0, 0);
}
#endif

/* The JSON string of an ASCII key whose characters all stand for themselves, or NULL
 * (no exception) when the key is anything else. */
static PyObject *
plain_key_json(PyObject *key, Py_ssize_t max_key_length)
{
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key))
        return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(key);
    if (n == 0 || n > max_key_length)
        return NULL;
    const unsigned char *s = PyUnicode_1BYTE_DATA(key);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!key_plain[s[i]])
            return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + 2);
    if (out == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(out);
    d[0] = '"';
    memcpy(d + 1, s, n);
    d[n + 1] = '"';
    return out;
}

PyDoc_STRVAR(prepare_plain_doc,
"prepare_plain(changes, known, max_key_length, max_depth, /)\n--\n\n"
"The fast path of protocol._prepare_request: a list of (collection, key, key_json,\n"
"value) tuples (collection: the str object `known` maps the name to), or None when\n"
"any change is not the common case (a delete, a missing value, an unknown\n"
"collection, a key that is empty, too long or not printable ASCII, a value that is\n"
"not canonical as sent or may hold a number out of range). None for an empty list.");

static PyObject *
prepare_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "prepare_plain takes 4 arguments");
        return NULL;
    }
    PyObject *changes = args[0], *known = args[1];
    Py_ssize_t max_key_length = PyLong_AsSsize_t(args[2]);
    if (max_key_length == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_depth = PyLong_AsSsize_t(args[3]);
    if (max_depth == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(changes) || !PyDict_Check(known)) {
        PyErr_SetString(PyExc_TypeError, "prepare_plain(list, dict, int, int)");
        return NULL;
    }
    if (PyList_GET_SIZE(changes) == 0)
        Py_RETURN_NONE;
    /* A copy of the list to walk: a field read or a truth test may run Python code
     * that changes the list itself. */
    PyObject *items = PySequence_Tuple(changes);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(items);
        return NULL;
    }
    PyObject *name = NULL, *key = NULL, *raw = NULL, *flag = NULL, *key_json = NULL;
    PyObject *value = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyTuple_GET_ITEM(items, i);
        if (Py_TYPE(c) != change_fields.type)
            map_fields(Py_TYPE(c));
        if ((flag = get_field(c, 3)) == NULL)
            goto error;
        int is_delete = PyObject_IsTrue(flag);
        Py_CLEAR(flag);
        if (is_delete != 0) {
            if (is_delete < 0)
                goto error;
            goto fallback;
        }
        if ((name = get_field(c, 0)) == NULL)
            goto error;
        if (!PyUnicode_CheckExact(name))
            goto fallback;
        /* The known name's own str object: the batch's records share it. */
        PyObject *canonical = PyDict_GetItemWithError(known, name); /* borrowed */
        if (canonical == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto fallback;
        }
        Py_INCREF(canonical);
        Py_SETREF(name, canonical);
        if ((key = get_field(c, 1)) == NULL)
            goto error;
        if ((key_json = plain_key_json(key, max_key_length)) == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto fallback;
        }
        if ((raw = get_field(c, 2)) == NULL)
            goto error;
        Py_buffer view;
        if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0)
            goto error;
        if (!value_is_plain(view.buf, view.len, max_depth)) {
            PyBuffer_Release(&view);
            goto fallback;
        }
        value = PyBytes_FromStringAndSize(view.buf, view.len);
        PyBuffer_Release(&view);
        if (value == NULL)
            goto error;
        Py_CLEAR(raw);
        PyObject *t = PyTuple_New(4);
        if (t == NULL)
            goto error;
        /* The tuple takes the references. */
        PyTuple_SET_ITEM(t, 0, name);
        PyTuple_SET_ITEM(t, 1, key);
        PyTuple_SET_ITEM(t, 2, key_json);
        PyTuple_SET_ITEM(t, 3, value);
        name = key = key_json = value = NULL;
        /* Strings and bytes only: no cycle can go through it. CPython's collector
         * untracks such tuples itself, but only once it has scanned them; a publish
         * makes a thousand, which would set a collection off on every batch. */
        PyObject_GC_UnTrack(t);
        PyList_SET_ITEM(out, i, t);
    }
    Py_DECREF(items);
    return out;

fallback:
    Py_XDECREF(name);
    Py_XDECREF(key);
    Py_XDECREF(raw);
    Py_XDECREF(key_json);
    Py_DECREF(out);
    Py_DECREF(items);
    Py_RETURN_NONE;
error:
    Py_XDECREF(name);
    Py_XDECREF(key);
    Py_XDECREF(raw);
    Py_XDECREF(key_json);
    Py_XDECREF(value);
    Py_DECREF(out);
    Py_DECREF(items);
    return NULL;
}

/* -- encode_records ----------------------------------------------------------------- */

static const char REC_0[] = "{\"type\":\"record\",\"seq\":";
static const char REC_1[] = ",\"collection\":\"";
static const char REC_2[] = "\",\"key\":";
static const char REC_3[] = ",\"value\":";
static const char REC_4[] = "}\n";
#define LIT(s) (sizeof(s) - 1)

/* Decimal digits of a non-negative seq into buf (at least 20 bytes); returns length. */
static Py_ssize_t
format_seq(unsigned long long v, char *buf)
{
    char tmp[24];
    Py_ssize_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (Py_ssize_t i = 0; i < n; i++)
        buf[i] = tmp[n - 1 - i];
    return n;
}

PyDoc_STRVAR(encode_records_doc,
"encode_records(batch, first_seq, record_type, record_line, delete_line, /)\n--\n\n"
"state.encode_batch: give a batch of prepared changes consecutive seqs from first_seq\n"
"and build each one's Record: record_type(seq, collection, key, line, deleted). An\n"
"upsert's line is record_line % (seq, collection.encode(), key_json, value) (§4.1),\n"
"written here directly; a delete's is delete_line(seq, collection, key_json).\n"
"None when first_seq is not an int or the seqs do not all fit 0 .. 2**63-1\n"
"(encode_batch_py does those).");

static PyObject *
encode_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "encode_records takes 5 arguments");
        return NULL;
    }
    PyObject *batch = args[0], *record_type = args[2], *record_line = args[3];
    PyObject *delete_line = args[4];
    if (!PyLong_Check(args[1]))
        Py_RETURN_NONE; /* not an int: Python's formatting decides */
    int overflow = 0;
    long long first = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (first == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq_obj = NULL, *line = NULL, *item = NULL;
    /* A copy to walk: delete_line, record_type or a value's formatting may run Python
     * code that changes the batch itself. */
    PyObject *fast = PySequence_Tuple(batch);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fast);
    if (overflow || first < 0 || (n > 0 && first > LLONG_MAX - (n - 1))) {
        Py_DECREF(fast);
        Py_RETURN_NONE; /* seqs that are not all in 0 .. 2**63-1: Python's ints do it */
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(fast);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long seq = first + i;
        item = PySequence_Tuple(PyTuple_GET_ITEM(fast, i));
        if (item == NULL)
            goto error;
        if (PyTuple_GET_SIZE(item) != 4) {
            PyErr_Format(PyExc_ValueError, "a prepared change is 4 items, not %zd",
                         PyTuple_GET_SIZE(item));
            goto error;
        }
        PyObject *name = PyTuple_GET_ITEM(item, 0), *key = PyTuple_GET_ITEM(item, 1);
        PyObject *key_json = PyTuple_GET_ITEM(item, 2), *value = PyTuple_GET_ITEM(item, 3);
        if ((seq_obj = PyLong_FromLongLong(seq)) == NULL)
            goto error;
        PyObject *deleted;
        if (value == Py_None) {
            line = PyObject_CallFunctionObjArgs(delete_line, seq_obj, name, key_json, NULL);
            deleted = Py_True;
        }
        else if (PyUnicode_CheckExact(name) && PyBytes_CheckExact(key_json)
                 && PyBytes_CheckExact(value)) {
            Py_ssize_t name_len;
            const char *name_s = PyUnicode_AsUTF8AndSize(name, &name_len);
            if (name_s == NULL)
                goto error;
            char digits[24];
            Py_ssize_t seq_len = format_seq((unsigned long long)seq, digits);
            Py_ssize_t kl = PyBytes_GET_SIZE(key_json), vl = PyBytes_GET_SIZE(value);
            line = PyBytes_FromStringAndSize(
                NULL, LIT(REC_0) + seq_len + LIT(REC_1) + name_len + LIT(REC_2) + kl
                          + LIT(REC_3) + vl + LIT(REC_4));
            if (line != NULL) {
                char *d = PyBytes_AS_STRING(line);
                memcpy(d, REC_0, LIT(REC_0)), d += LIT(REC_0);
                memcpy(d, digits, seq_len), d += seq_len;
                memcpy(d, REC_1, LIT(REC_1)), d += LIT(REC_1);
                memcpy(d, name_s, name_len), d += name_len;
                memcpy(d, REC_2, LIT(REC_2)), d += LIT(REC_2);
                memcpy(d, PyBytes_AS_STRING(key_json), kl), d += kl;
                memcpy(d, REC_3, LIT(REC_3)), d += LIT(REC_3);
                memcpy(d, PyBytes_AS_STRING(value), vl), d += vl;
                memcpy(d, REC_4, LIT(REC_4));
            }
            deleted = Py_False;
        }
        else {
            /* Anything unusual is formatted as Python does it, with Python's errors:
             * name.encode(), then RECORD_LINE % (...). */
            if (PyObject_Hash(name) == -1) /* encode_batch_py keys a dict by it first */
                goto error;
            PyObject *name_b = PyObject_CallMethod(name, "encode", NULL);
            if (name_b == NULL)
                goto error;
            PyObject *fmt_args = PyTuple_Pack(4, seq_obj, name_b, key_json, value);
            Py_DECREF(name_b);
            if (fmt_args == NULL)
                goto error;
            line = PyNumber_Remainder(record_line, fmt_args);
            Py_DECREF(fmt_args);
            deleted = Py_False;
        }
        if (line == NULL)
            goto error;
        PyObject *call_args[5] = {seq_obj, name, key, line, deleted};
        PyObject *rec = PyObject_Vectorcall(record_type, call_args, 5, NULL);
        Py_CLEAR(seq_obj);
        Py_CLEAR(line);
        Py_CLEAR(item);
        if (rec == NULL)
            goto error;
        PyList_SET_ITEM(out, i, rec);
    }
    Py_DECREF(fast);
    return out;
error:
    Py_XDECREF(seq_obj);
    Py_XDECREF(line);
    Py_XDECREF(item);
    Py_DECREF(fast);
    Py_DECREF(out);
    return NULL;
}

/* -- install_upserts ---------------------------------------------------------------- */

/* A Record's fields, by offset (see map_fields); -1: getattr/setattr. */
static PyObject *rec_names[5]; /* collection, key, line, deleted, before */
static PyTypeObject *rec_type;
static Py_ssize_t rec_offset[5];
static PyObject *coll_names[5]; /* name, index, slots, lines, live */

static Py_ssize_t rec_seq_offset = -1; /* Record.seq */
static PyObject *seq_name;

static void
map_record(PyTypeObject *type)
{
    Py_INCREF(type);
    Py_XSETREF(rec_type, type); /* strong: compared by identity, so it must not die */
    rec_seq_offset = -1;
    PyObject *seq_descr = _PyType_Lookup(type, seq_name);
    if (seq_descr != NULL && Py_IS_TYPE(seq_descr, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)seq_descr)->d_member;
        if (m->type == T_OBJECT_EX || m->type == T_OBJECT)
            rec_seq_offset = m->offset;
    }
    for (int i = 0; i < 5; i++) {
        rec_offset[i] = -1;
        PyObject *descr = _PyType_Lookup(type, rec_names[i]);
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
            if (m->type == T_OBJECT_EX || m->type == T_OBJECT)
                rec_offset[i] = m->offset;
        }
    }
}

/* A borrowed reference to field i of a record (read by offset), or NULL when it must
 * be read with getattr. */
static inline PyObject *
rec_field_borrowed(PyObject *rec, int i)
{
    Py_ssize_t off = rec_offset[i];
    return off >= 0 ? *(PyObject **)((char *)rec + off) : NULL;
}

static PyObject *
rec_field(PyObject *rec, int i)
{
    PyObject *v = rec_field_borrowed(rec, i);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    return PyObject_GetAttr(rec, rec_names[i]);
}

/* The open collection of a run of records: its attributes, read once per run. */
typedef struct {
    PyObject *name;  /* the record's collection name this run is for */
    PyObject *coll;
    PyObject *index; /* dict: key -> position */
    PyObject *slots; /* list of Records */
    PyObject *lines; /* list of their lines */
    Py_ssize_t added_live;
} Run;

static void
run_clear(Run *r)
{
    Py_CLEAR(r->name);
    Py_CLEAR(r->coll);
    Py_CLEAR(r->index);
    Py_CLEAR(r->slots);
    Py_CLEAR(r->lines);
    r->added_live = 0;
}

/* Write back the run's count of records that became live (coll.live += n). */
static int
run_flush(Run *r)
{
    if (r->coll == NULL || r->added_live == 0)
        return 0;
    PyObject *live = PyObject_GetAttr(r->coll, coll_names[4]);
    if (live == NULL)
        return -1;
    PyObject *n = PyLong_FromSsize_t(r->added_live);
    if (n == NULL) {
        Py_DECREF(live);
        return -1;
    }
    PyObject *sum = PyNumber_Add(live, n);
    Py_DECREF(live);
    Py_DECREF(n);
    if (sum == NULL)
        return -1;
    int rc = PyObject_SetAttr(r->coll, coll_names[4], sum);
    Py_DECREF(sum);
    r->added_live = 0;
    return rc;
}

/* Open the run for collection `name`: collections[name], made with
 * collection_type(name) when missing. 0 ok, 1 not the expected types (leave the rest
 * to Python), -1 error. */
static int
run_open(Run *r, PyObject *name, PyObject *collections, PyObject *collection_type)
{
    if (run_flush(r) < 0)
        return -1;
    run_clear(r);
    PyObject *coll = PyDict_GetItemWithError(collections, name); /* borrowed */
    if (coll == NULL) {
        if (PyErr_Occurred())
            return -1;
        coll = PyObject_CallOneArg(collection_type, name);
        if (coll == NULL)
            return -1;
        if (PyDict_SetItem(collections, name, coll) < 0) {
            Py_DECREF(coll);
            return -1;
        }
    }
    else {
        Py_INCREF(coll);
    }
    r->coll = coll;
    Py_INCREF(name);
    r->name = name;
    if ((r->index = PyObject_GetAttr(coll, coll_names[1])) == NULL
        || (r->slots = PyObject_GetAttr(coll, coll_names[2])) == NULL
        || (r->lines = PyObject_GetAttr(coll, coll_names[3])) == NULL)
        return -1;
    if (!PyDict_CheckExact(r->index) || !PyList_CheckExact(r->slots)
        || !PyList_CheckExact(r->lines))
        return 1;
    return 0;
}

PyDoc_STRVAR(install_upserts_doc,
"install_upserts(records, collections, collection_type, /)\n--\n\n"
"The loop of State.install for upserts while no snapshot is open: install records\n"
"from the first on, and stop at the first delete. Returns how many were installed;\n"
"State.install does the rest. For each record: its collection (made with\n"
"collection_type(name) when missing); one dict lookup that finds the key's position\n"
"or adds it at the end; record.before set to the record it replaced (None: new); the\n"
"slot and its line replaced or appended; live counted.");

static PyObject *
install_upserts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "install_upserts takes 3 arguments");
        return NULL;
    }
    PyObject *records = args[0], *collections = args[1], *collection_type = args[2];
    if (!PyList_CheckExact(records) || !PyDict_CheckExact(collections)) {
        PyErr_SetString(PyExc_TypeError, "install_upserts(list, dict, type)");
        return NULL;
    }
    Run run = {NULL, NULL, NULL, NULL, NULL, 0};
    /* A copy to walk: collection_type() runs Python code. Anything that could run
     * Python code in the middle of a record (a name or key that is not exactly a
     * str, a `deleted` that is not exactly a bool) stops the loop there instead: the
     * Python loop goes on from that record. */
    PyObject *items = PySequence_Tuple(records);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items), i = 0;
    PyObject *name = NULL, *key = NULL, *line = NULL, *pos = NULL;
    for (; i < n; i++) {
        PyObject *rec = PyTuple_GET_ITEM(items, i);
        if (Py_TYPE(rec) != rec_type)
            map_record(Py_TYPE(rec));
        PyObject *deleted = rec_field_borrowed(rec, 3);
        if (deleted != Py_False)
            break; /* a delete, or a field this loop cannot read: Python goes on */
        if ((name = rec_field(rec, 0)) == NULL)
            goto error;
        if (!PyUnicode_CheckExact(name)) {
            Py_CLEAR(name);
            break;
        }
        if (run.name == NULL
            || (name != run.name && PyObject_RichCompareBool(name, run.name, Py_EQ) != 1)) {
            if (PyErr_Occurred())
                goto error;
            int rc = run_open(&run, name, collections, collection_type);
            if (rc < 0)
                goto error;
            if (rc > 0) {
                Py_CLEAR(name);
                break;
            }
        }
        Py_CLEAR(name);
        if ((key = rec_field(rec, 1)) == NULL)
            goto error;
        if (!PyUnicode_CheckExact(key)) {
            Py_CLEAR(key);
            break;
        }
        if ((line = rec_field(rec, 2)) == NULL)
            goto error;
        Py_ssize_t end = PyList_GET_SIZE(run.slots);
        if ((pos = PyLong_FromSsize_t(end)) == NULL)
            goto error;
        /* One lookup: the key's position, or this new one added. */
        PyObject *found = PyDict_SetDefault(run.index, key, pos); /* borrowed */
        if (found == NULL)
            goto error;
        PyObject *before;
        if (found == pos) {
            if (PyList_Append(run.slots, rec) < 0 || PyList_Append(run.lines, line) < 0)
                goto error;
            run.added_live++;
            before = Py_None;
        }
        else {
            Py_ssize_t at = PyLong_AsSsize_t(found);
            if (at == -1 && PyErr_Occurred())
                goto error;
            if (at < 0 || at >= PyList_GET_SIZE(run.slots) || at >= PyList_GET_SIZE(run.lines)) {
                PyErr_SetString(PyExc_RuntimeError, "a collection's index and slots disagree");
                goto error;
            }
            before = PyList_GET_ITEM(run.slots, at); /* borrowed, for now */
            PyObject *was = Py_TYPE(before) == rec_type ? rec_field_borrowed(before, 3) : NULL;
            if (was != Py_True && was != Py_False) {
                /* Not a plain Record: the Python loop takes this one (the key is in
                 * the index already, at its old position, as it expects). */
                Py_CLEAR(pos);
                Py_CLEAR(key);
                Py_CLEAR(line);
                break;
            }
            run.added_live += was == Py_True;
            /* The slot's reference to the old record moves to `before`. */
            Py_INCREF(rec);
            PyList_SET_ITEM(run.slots, at, rec);
            Py_INCREF(line);
            PyObject *old_line = PyList_GET_ITEM(run.lines, at);
            PyList_SET_ITEM(run.lines, at, line);
            Py_DECREF(old_line);
            int rc = PyObject_SetAttr(rec, rec_names[4], before);
            Py_DECREF(before);
            if (rc < 0)
                goto error;
            Py_CLEAR(pos);
            Py_CLEAR(key);
            Py_CLEAR(line);
            continue;
        }
        if (PyObject_SetAttr(rec, rec_names[4], before) < 0)
            goto error;
        Py_CLEAR(pos);
        Py_CLEAR(key);
        Py_CLEAR(line);
    }
    Py_DECREF(items);
    if (run_flush(&run) < 0) {
        run_clear(&run);
        return NULL;
    }
    run_clear(&run);
    return PyLong_FromSsize_t(i);
error:
    Py_DECREF(items);
    Py_XDECREF(name);
    Py_XDECREF(key);
    Py_XDECREF(line);
    Py_XDECREF(pos);
    /* What was installed stays installed; count it before giving up. */
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        run_flush(&run);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    run_clear(&run);
    return NULL;
}

/* -- join_lines --------------------------------------------------------------------- */

PyDoc_STRVAR(join_lines_doc,
"join_lines(lines, slots, start, end, max_bytes, seq, /)\n--\n\n"
"The fast path of Snapshot.read_joined: lines[start:stop] joined into one bytes\n"
"object, and stop. stop is the first position at which the bytes taken reach\n"
"max_bytes (that line included), or end. With slots (not None) it also stops at\n"
"the first slot whose record is newer than seq or a tombstone, which the caller\n"
"then reads through its versions (stop == start: nothing taken). In one pass over\n"
"the lines' lengths and one copy, where slice + sum(map(len)) + b''.join make four.");

static PyObject *
join_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "join_lines takes 6 arguments");
        return NULL;
    }
    PyObject *lines = args[0], *slots = args[1];
    if (!PyList_CheckExact(lines) || (slots != Py_None && !PyList_CheckExact(slots))) {
        PyErr_SetString(PyExc_TypeError, "join_lines(list, list | None, int, int, int, int)");
        return NULL;
    }
    Py_ssize_t start, end, max_bytes;
    long long seq;
    if (((start = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred())
        || ((end = PyLong_AsSsize_t(args[3])) == -1 && PyErr_Occurred())
        || ((max_bytes = PyLong_AsSsize_t(args[4])) == -1 && PyErr_Occurred())
        || ((seq = PyLong_AsLongLong(args[5])) == -1 && PyErr_Occurred()))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(lines);
    if (end > n)
        end = n;
    if (slots != Py_None && end > PyList_GET_SIZE(slots))
        end = PyList_GET_SIZE(slots);
    if (start < 0)
        start = 0;
    /* First pass: how far, and how many bytes. Nothing here runs Python code. */
    Py_ssize_t size = 0, stop = start;
    while (stop < end && size < max_bytes) {
        PyObject *line = PyList_GET_ITEM(lines, stop);
        if (!PyBytes_CheckExact(line)) {
            PyErr_SetString(PyExc_TypeError, "a snapshot line is not bytes");
            return NULL;
        }
        if (slots != Py_None) {
            PyObject *rec = PyList_GET_ITEM(slots, stop);
            if (Py_TYPE(rec) != rec_type)
                map_record(Py_TYPE(rec));
            if (rec_offset[3] < 0 || rec_seq_offset < 0)
                break; /* fields this loop cannot read: Python's loop reads them */
            PyObject *deleted = rec_field_borrowed(rec, 3);
            PyObject *rseq = *(PyObject **)((char *)rec + rec_seq_offset);
            if (deleted != Py_False || rseq == NULL || !PyLong_CheckExact(rseq))
                break;
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(rseq, &overflow);
            if (overflow || v > seq)
                break;
        }
        size += PyBytes_GET_SIZE(line);
        stop++;
    }
    PyObject *blob = PyBytes_FromStringAndSize(NULL, size);
    if (blob == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(blob);
    for (Py_ssize_t k = start; k < stop; k++) {
        PyObject *line = PyList_GET_ITEM(lines, k);
        Py_ssize_t len = PyBytes_GET_SIZE(line);
        memcpy(d, PyBytes_AS_STRING(line), len);
        d += len;
    }
    PyObject *stop_obj = PyLong_FromSsize_t(stop);
    if (stop_obj == NULL) {
        Py_DECREF(blob);
        return NULL;
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(blob);
        Py_DECREF(stop_obj);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, blob);
    PyTuple_SET_ITEM(out, 1, stop_obj);
    return out;
}

/* -- the module --------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"prepare_plain", (PyCFunction)(void (*)(void))prepare_plain, METH_FASTCALL,
     prepare_plain_doc},
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     encode_records_doc},
    {"install_upserts", (PyCFunction)(void (*)(void))install_upserts, METH_FASTCALL,
     install_upserts_doc},
    {"join_lines", (PyCFunction)(void (*)(void))join_lines, METH_FASTCALL, join_lines_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "statecast._speedups",
    "C versions of the publish hot path (see statecast.core.accel).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    for (int c = 0x21; c < 0x80; c++)
        value_class[c] = 1;
    value_class['['] = value_class['{'] = 2;
    value_class['\\'] = 0;
    for (const char *p = "0123456789+-"; *p; p++)
        numeric[(unsigned char)*p] = 1;
    for (int c = 0x20; c < 0x80; c++)
        key_plain[c] = 1;
    key_plain['"'] = key_plain['\\'] = 0;
    const char *names[4] = {"collection", "key", "value", "delete"};
    for (int i = 0; i < 4; i++) {
        field_names[i] = PyUnicode_InternFromString(names[i]);
        if (field_names[i] == NULL)
            return NULL;
    }
    if ((seq_name = PyUnicode_InternFromString("seq")) == NULL)
        return NULL;
    const char *rnames[5] = {"collection", "key", "line", "deleted", "before"};
    const char *cnames[5] = {"name", "index", "slots", "lines", "live"};
    for (int i = 0; i < 5; i++) {
        rec_names[i] = PyUnicode_InternFromString(rnames[i]);
        coll_names[i] = PyUnicode_InternFromString(cnames[i]);
        if (rec_names[i] == NULL || coll_names[i] == NULL)
            return NULL;
    }
    return PyModule_Create(&module_def);
}
