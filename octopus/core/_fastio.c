/* accept(), read() and write() on non-blocking descriptors, holding the GIL.
 *
 * The optional compiled half of octopus.core.fdio (see there for the
 * pure-Python path, which behaves the same). A non-blocking socket never
 * sleeps in these calls: each costs what the kernel's work costs, less than
 * handing the GIL to another thread and taking it back, which os.read,
 * os.write and socket.accept do on every call.
 *
 * read() reads into one buffer of this module and copies out the bytes that
 * came (most reads are small: a 64 KiB allocation trimmed to the message
 * would cost more than the copy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
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

/* The descriptor of a call that takes two arguments, the first one it. */
static int
fd_argument(PyObject *const *args, Py_ssize_t nargs, const char *usage)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s takes 2 arguments", usage);
        return -1;
    }
    return as_fd(args[0]);
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
    int fd = fd_argument(args, nargs, "read(fd, size)");
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
    int fd = fd_argument(args, nargs, "write(fd, data)");
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

/* The peer's address as the socket module gives it: (host, port) for IPv4,
 * (host, port, flowinfo, scope_id) for IPv6; the host is numeric, with
 * "%zone" for a scoped IPv6 address, as getnameinfo(NI_NUMERICHOST) writes it. */
static PyObject *
address(const struct sockaddr_storage *peer, socklen_t length)
{
    char host[NI_MAXHOST];
    int error = getnameinfo((const struct sockaddr *)peer, length, host, sizeof host,
                            NULL, 0, NI_NUMERICHOST);
    if (error != 0) {
        PyErr_Format(PyExc_OSError, "getnameinfo: %s", gai_strerror(error));
        return NULL;
    }
    if (peer->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)peer;
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (peer->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)peer;
        return Py_BuildValue("(siII)", host, ntohs(v6->sin6_port),
                             ntohl(v6->sin6_flowinfo), v6->sin6_scope_id);
    }
    PyErr_SetString(PyExc_ValueError, "accept: not an IPv4 or IPv6 listener");
    return NULL;
}

/* accept(fd) -> (fd, address): one connection from a TCP listener, already
 * non-blocking and close-on-exec (accept4 flags: the socket module has no
 * way to ask for SOCK_NONBLOCK, and then needs one more call to set it). */
static PyObject *
fastio_accept(PyObject *module, PyObject *listener)
{
    int listener_fd = as_fd(listener);
    if (listener_fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    struct sockaddr_storage peer;
    socklen_t length = sizeof peer;
    int fd;
    while ((fd = accept4(listener_fd, (struct sockaddr *)&peer, &length,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)) < 0) {
        if (fail() < 0) {
            return NULL;
        }
        length = sizeof peer;
    }
    PyObject *peer_address = address(&peer, length);
    if (peer_address == NULL) {
        close(fd);
        return NULL;
    }
    return Py_BuildValue("(iN)", fd, peer_address);
}

static PyMethodDef fastio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))fastio_read, METH_FASTCALL,
     "read(fd, size) -> bytes: os.read for a non-blocking descriptor, GIL held."},
    {"write", (PyCFunction)(void (*)(void))fastio_write, METH_FASTCALL,
     "write(fd, data) -> int: os.write for a non-blocking descriptor, GIL held."},
    {"accept", fastio_accept, METH_O,
     "accept(fd) -> (fd, address): a non-blocking connection from a TCP listener."},
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
