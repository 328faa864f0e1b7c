/* read() and write() on a non-blocking descriptor, without releasing the GIL.
 *
 * The optional compiled half of octopus.core.connection's message path; the
 * pure-Python path uses os.read and os.write, which behave the same. A
 * non-blocking socket never sleeps in read() or write(): the call costs what
 * the kernel's copy costs, less than handing the GIL to another thread and
 * taking it back, which os.read and os.write do on every call.
 *
 * read() reads into one buffer of this module and copies out the bytes that
 * came (most reads are small: a 64 KiB allocation trimmed to the message
 * would cost more than the copy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <unistd.h>

#define BUFFER_SIZE 65536

static char buffer[BUFFER_SIZE];

/* The descriptor in ``obj``; -1 with an exception set if it is no int.
 * A negative one goes to the system call, which fails with EBADF. */
static int
as_fd(PyObject *obj)
{
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd does not fit in an int");
        return -1;
    }
    return (int)fd;
}

/* -1 with an exception set, or 0 to try the call again (EINTR, and no
 * signal handler raised). */
static int
fail(void)
{
    if (errno == EINTR && PyErr_CheckSignals() == 0) {
        return 0;
    }
    if (!PyErr_Occurred()) {
        PyErr_SetFromErrno(PyExc_OSError);  /* EAGAIN: BlockingIOError, EPIPE: ... */
    }
    return -1;
}

static PyObject *
fastio_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(fd, size) takes 2 arguments");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "size must be at least 0");
        }
        return NULL;
    }
    if (size > BUFFER_SIZE) {
        size = BUFFER_SIZE;  /* a short read, as a stream socket may give anyway */
    }
    ssize_t n;
    while ((n = read(fd, buffer, (size_t)size)) < 0) {
        if (fail() < 0) {
            return NULL;
        }
    }
    return PyBytes_FromStringAndSize(buffer, n);
}

static PyObject *
fastio_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(fd, data) takes 2 arguments");
        return NULL;
    }
    int fd = as_fd(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    ssize_t n;
    while ((n = write(fd, data.buf, (size_t)data.len)) < 0) {
        if (fail() < 0) {
            PyBuffer_Release(&data);
            return NULL;
        }
    }
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef fastio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))fastio_read, METH_FASTCALL,
     "read(fd, size) -> bytes: os.read for a non-blocking descriptor, GIL held."},
    {"write", (PyCFunction)(void (*)(void))fastio_write, METH_FASTCALL,
     "write(fd, data) -> int: os.write for a non-blocking descriptor, GIL held."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastio_module = {
    PyModuleDef_HEAD_INIT, "octopus.core._fastio",
    "read() and write() on non-blocking descriptors without releasing the GIL.",
    -1, fastio_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    return PyModule_Create(&fastio_module);
}
