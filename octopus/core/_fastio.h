/* What the parts of octopus.core._fastio share: _fastio.c (system calls,
 * framers, admission) and _hotpath.c (the loop's dispatch and send()). */
#ifndef OCTOPUS_FASTIO_H
#define OCTOPUS_FASTIO_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define BUFFER_SIZE 65536

/* Every read of the module lands here first; its bytes are copied out
 * before any Python code runs. */
extern char fastio_buffer[BUFFER_SIZE];

typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t start, size, capacity;
    Py_ssize_t max;
    /* line: data[start:start + searched] holds no '\n' (never scanned twice) */
    Py_ssize_t searched;
    /* line: bytes handed to memchr in all, each once (the tests read it) */
    Py_ssize_t scanned;
    /* length: the body length of the frame in front once its header is
     * parsed and checked against max; -1 while the header is pending */
    Py_ssize_t need;
    int eof;
} Framer;

extern PyTypeObject LineFramerType, LengthFramerType;
extern PyObject *too_large;  /* framing.MessageTooLarge */

/* -1 with an exception set, or 0 to try the call again (EINTR, and no
 * signal handler raised). */
int fastio_fail(void);

/* The bytes of ``obj`` without a copy (release with release_bytes()). */
int get_bytes(PyObject *obj, Py_buffer *view);
void release_bytes(Py_buffer *view);

/* Append head, the message ``view`` and tail to the bytearray ``buffer``. */
PyObject *append_framed(PyObject *buffer, const char *head, Py_ssize_t head_size,
                        Py_buffer *view, const char *tail, Py_ssize_t tail_size);

/* The 4-byte length prefix of ``message`` (read as ``view``). */
int length_header(PyObject *message, Py_buffer *view, char header[4]);

/* A line or length framer's feed_messages(), from a buffer: a new list. */
PyObject *framer_messages(Framer *self, const char *data, Py_ssize_t size);

/* _hotpath.c: its types and functions, added to the module. */
int hotpath_init(PyObject *module);
extern PyMethodDef hotpath_methods[];

#endif
