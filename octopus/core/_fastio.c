/* accept(), read() and write() on non-blocking descriptors, holding the GIL;
 * the line and length framers; the admission table. (The loop's dispatch and
 * send() are in _hotpath.c, the same module.)
 *
 * The optional compiled half of octopus.core.fdio and octopus.core.framing
 * (see there for the pure-Python paths, which behave the same). A non-blocking socket never
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
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "_fastio.h"

char fastio_buffer[BUFFER_SIZE];

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
int
fastio_fail(void)
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
    while ((n = read(fd, fastio_buffer, (size_t)size)) < 0) {
        if (fastio_fail() < 0) {
            return NULL;
        }
    }
    return PyBytes_FromStringAndSize(fastio_buffer, n);
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
        if (fastio_fail() < 0) {
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
        if (fastio_fail() < 0) {
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

/* ---- The line and length framers (octopus.core.framing) -------------------
 *
 * The semantics, limits and error messages of LineFramer and LengthFramer in
 * framing.py, which documents them; make_framer() picks these when compiled.
 * The bytes held are data[start:start + size] in a buffer of the framer's
 * own: taking a message from the front moves start, appending compacts or
 * grows. feed_messages() on an empty buffer (the usual case: a read ends
 * where a message ends) frames the chunk where it lies and copies only an
 * unfinished tail into the buffer.
 */

static PyObject *need_data;   /* framing.NEED_DATA, given by bind() */
PyObject *too_large;          /* framing.MessageTooLarge */

#define MAX_LENGTH 0xFFFFFFFFu    /* the largest length a 4-byte prefix declares */
#define KEEP_CAPACITY 16384       /* an emptied buffer larger than this is freed */


/* One step of next_message(): 1 and a new reference in *message, 0 for
 * NEED_DATA, -1 with an exception set. */
typedef int (*next_fn)(Framer *, PyObject **);

/* The bytes of ``obj`` without a copy: exact bytes directly, else through
 * the buffer protocol (release with release_bytes()). */
int
get_bytes(PyObject *obj, Py_buffer *view)
{
    if (PyBytes_CheckExact(obj)) {
        view->obj = NULL;
        view->buf = PyBytes_AS_STRING(obj);
        view->len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

void
release_bytes(Py_buffer *view)
{
    if (view->obj != NULL) {
        PyBuffer_Release(view);
    }
}

static PyObject *
framer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"max_size", NULL};
    PyObject *max_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", keywords, &max_size)) {
        return NULL;
    }
    if (need_data == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "import octopus.core.framing first: it binds the framers");
        return NULL;
    }
    Py_ssize_t max = PyNumber_AsSsize_t(max_size, NULL);  /* a huge one: clipped */
    if (max == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (max < 0) {
        PyErr_Format(PyExc_ValueError, "max_size must be >= 0, got %S", max_size);
        return NULL;
    }
    Framer *self = (Framer *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->max = max;
        self->need = -1;
    }
    return (PyObject *)self;
}

static void
framer_dealloc(Framer *self)
{
    PyMem_Free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Append n bytes to what is held; -1 with MemoryError set. */
static int
hold(Framer *self, const char *bytes, Py_ssize_t n)
{
    if (n > PY_SSIZE_T_MAX - self->size) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t size = self->size + n;
    if (self->start + size > self->capacity) {
        /* Move the held bytes to the front only when as many were taken
         * from there: each byte is moved O(1) times, amortised. */
        if (size <= self->capacity && self->start >= self->size) {
            memmove(self->data, self->data + self->start, (size_t)self->size);
        }
        else {
            Py_ssize_t capacity = self->capacity > PY_SSIZE_T_MAX / 2 ? PY_SSIZE_T_MAX
                                                                        : self->capacity * 2;
            if (capacity < size) {
                capacity = size;
            }
            if (capacity < 256) {
                capacity = 256;
            }
            char *data = PyMem_Malloc((size_t)capacity);
            if (data == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            if (self->size) {
                memcpy(data, self->data + self->start, (size_t)self->size);
            }
            PyMem_Free(self->data);
            self->data = data;
            self->capacity = capacity;
        }
        self->start = 0;
    }
    memcpy(self->data + self->start + self->size, bytes, (size_t)n);
    self->size = size;
    return 0;
}

/* Drop n bytes from the front. */
static void
consume(Framer *self, Py_ssize_t n)
{
    self->start += n;
    self->size -= n;
    if (self->size == 0) {
        self->start = 0;
        if (self->capacity > KEEP_CAPACITY) {
            PyMem_Free(self->data);
            self->data = NULL;
            self->capacity = 0;
        }
    }
}

static int
feed_bytes(Framer *self, const char *bytes, Py_ssize_t n)
{
    if (n == 0) {
        self->eof = 1;
        return 0;
    }
    if (self->eof) {
        PyErr_SetString(PyExc_RuntimeError, "data fed after EOF");
        return -1;
    }
    return hold(self, bytes, n);
}

/* Every message next() gives now, as a list. */
static PyObject *
drain(Framer *self, next_fn next)
{
    PyObject *messages = PyList_New(0);
    if (messages == NULL) {
        return NULL;
    }
    for (;;) {
        PyObject *message;
        int found = next(self, &message);
        if (found <= 0) {
            if (found == 0) {
                return messages;
            }
            Py_DECREF(messages);
            return NULL;
        }
        found = PyList_Append(messages, message);
        Py_DECREF(message);
        if (found < 0) {
            Py_DECREF(messages);
            return NULL;
        }
    }
}

/* next_message(): a message, NEED_DATA, or NULL with an exception set. */
static PyObject *
next_message(Framer *self, next_fn next)
{
    PyObject *message;
    int found = next(self, &message);
    if (found <= 0) {
        return found == 0 ? Py_NewRef(need_data) : NULL;
    }
    return message;
}

/* [bytes(data[:size])]: the usual read, one whole message. */
static PyObject *
one_message(const char *data, Py_ssize_t size)
{
    PyObject *message = PyBytes_FromStringAndSize(data, size);
    PyObject *messages = message == NULL ? NULL : PyList_New(1);
    if (messages == NULL) {
        Py_XDECREF(message);
        return NULL;
    }
    PyList_SET_ITEM(messages, 0, message);
    return messages;
}

/* feed(data) then drain(), framing a chunk in place where nothing is held;
 * frame_chunk() holds what it leaves over. */
static PyObject *
chunk_messages(Framer *self, const char *data, Py_ssize_t size, next_fn next,
               PyObject *(*frame_chunk)(Framer *, const char *, Py_ssize_t))
{
    if (self->size == 0 && size && !self->eof) {
        return frame_chunk(self, data, size);
    }
    if (feed_bytes(self, data, size) < 0) {
        return NULL;
    }
    return drain(self, next);
}

static PyObject *
feed_messages(Framer *self, PyObject *data, next_fn next,
              PyObject *(*frame_chunk)(Framer *, const char *, Py_ssize_t))
{
    Py_buffer view;
    if (get_bytes(data, &view) < 0) {
        return NULL;
    }
    PyObject *messages = chunk_messages(self, view.buf, view.len, next, frame_chunk);
    release_bytes(&view);
    return messages;
}

static PyObject *
framer_feed(Framer *self, PyObject *data)
{
    Py_buffer view;
    if (get_bytes(data, &view) < 0) {
        return NULL;
    }
    int result = feed_bytes(self, view.buf, view.len);
    release_bytes(&view);
    if (result < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
framer_unread(Framer *self, PyObject *Py_UNUSED(ignored))
{
    return PyBytes_FromStringAndSize(self->size ? self->data + self->start : "", self->size);
}

static PyObject *
framer_buffered(Framer *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->size);
}

/* Append head, message and tail to the bytearray ``buffer``; the message
 * is ``view``, already read. */
PyObject *
append_framed(PyObject *buffer, const char *head, Py_ssize_t head_size, Py_buffer *view,
              const char *tail, Py_ssize_t tail_size)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(buffer);
    if (view->len > PY_SSIZE_T_MAX - old - head_size - tail_size) {
        return PyErr_NoMemory();
    }
    /* A message that is the buffer, or a view of it, holds an export: the
     * resize then fails with BufferError, as buffer += message does. */
    if (PyByteArray_Resize(buffer, old + head_size + view->len + tail_size) < 0) {
        return NULL;
    }
    char *end = PyByteArray_AS_STRING(buffer) + old;
    memcpy(end, head, (size_t)head_size);
    memcpy(end + head_size, view->buf, (size_t)view->len);
    memcpy(end + head_size + view->len, tail, (size_t)tail_size);
    Py_RETURN_NONE;
}

/* frame_into(buffer, message)'s arguments: the bytearray, and the message
 * read as ``view``. */
static int
frame_into_arguments(PyObject *const *args, Py_ssize_t nargs, Py_buffer *view)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "frame_into(buffer, message) takes 2 arguments");
        return -1;
    }
    if (!PyByteArray_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "frame_into() needs a bytearray, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return -1;
    }
    return get_bytes(args[1], view);
}

/* -- line ------------------------------------------------------------------ */

static int
line_too_large(Framer *self)
{
    PyErr_Format(too_large, "message exceeds max_message_size (%zd bytes)", self->max);
    return -1;
}

static int
line_next(Framer *self, PyObject **message)
{
    const char *base = self->data + self->start;
    Py_ssize_t unsearched = self->size - self->searched;
    const char *newline = unsearched ? memchr(base + self->searched, '\n', (size_t)unsearched)
                                     : NULL;
    if (newline == NULL) {
        self->scanned += unsearched;
        /* The pending line is already longer than any acceptable message. */
        if (self->size > self->max) {
            return line_too_large(self);
        }
        if (self->eof && self->size) {
            if ((*message = PyBytes_FromStringAndSize(base, self->size)) == NULL) {
                return -1;
            }
            consume(self, self->size);
            self->searched = 0;
            return 1;
        }
        self->searched = self->size;
        return 0;
    }
    Py_ssize_t end = newline - base;
    self->scanned += end + 1 - self->searched;
    if (end > self->max) {
        return line_too_large(self);
    }
    if ((*message = PyBytes_FromStringAndSize(base, end)) == NULL) {
        return -1;
    }
    consume(self, end + 1);
    self->searched = 0;
    return 1;
}

/* The messages of a chunk fed to an empty framer; the rest is held. On an
 * oversized message, what remains from its start is held, as drain() would
 * leave it. */
static PyObject *
line_frame_chunk(Framer *self, const char *data, Py_ssize_t size)
{
    const char *end = data + size;
    const char *newline = memchr(data, '\n', (size_t)size);
    if (newline == end - 1 && size - 1 <= self->max) {  /* the usual read: one message */
        self->scanned += size;
        return one_message(data, size - 1);
    }
    PyObject *messages = PyList_New(0);
    if (messages == NULL) {
        return NULL;
    }
    for (; newline != NULL; newline = memchr(data, '\n', (size_t)(end - data))) {
        self->scanned += newline + 1 - data;
        if (newline - data > self->max) {
            goto too_large;
        }
        PyObject *message = PyBytes_FromStringAndSize(data, newline - data);
        if (message == NULL) {
            goto error;
        }
        int appended = PyList_Append(messages, message);
        Py_DECREF(message);
        if (appended < 0) {
            goto error;
        }
        data = newline + 1;
    }
    self->scanned += end - data;
    if (end - data > self->max) {
        goto too_large;
    }
    if (data < end && hold(self, data, end - data) < 0) {
        goto error;
    }
    self->searched = end - data;
    return messages;
too_large:
    if (hold(self, data, end - data) == 0) {
        line_too_large(self);
    }
error:
    Py_DECREF(messages);
    return NULL;
}

static PyObject *
line_next_message(Framer *self, PyObject *Py_UNUSED(ignored))
{
    return next_message(self, line_next);
}

static PyObject *
line_feed_messages(Framer *self, PyObject *data)
{
    return feed_messages(self, data, line_next, line_frame_chunk);
}

static PyObject *
line_frame(Framer *self, PyObject *message)
{
    Py_buffer view;
    if (get_bytes(message, &view) < 0) {
        return NULL;
    }
    PyObject *framed = PyBytes_FromStringAndSize(NULL, view.len + 1);
    if (framed != NULL) {
        char *bytes = PyBytes_AS_STRING(framed);
        memcpy(bytes, view.buf, (size_t)view.len);
        bytes[view.len] = '\n';
    }
    release_bytes(&view);
    return framed;
}

static PyObject *
line_frame_into(Framer *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (frame_into_arguments(args, nargs, &view) < 0) {
        return NULL;
    }
    PyObject *result = append_framed(args[0], "", 0, &view, "\n", 1);
    release_bytes(&view);
    return result;
}

static PyObject *
line_scanned(Framer *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->scanned);
}

/* -- length ---------------------------------------------------------------- */

static uint32_t
big_endian_32(const char *bytes)
{
    const unsigned char *b = (const unsigned char *)bytes;
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
}

static int
length_too_large(Framer *self, uint32_t declared)
{
    PyErr_Format(too_large, "declared length %lu exceeds max_message_size (%zd bytes)",
                 (unsigned long)declared, self->max);
    return -1;
}

/* No more bytes will come, so an incomplete frame never completes. */
static int
maybe_drop_at_eof(Framer *self)
{
    if (self->eof && self->size) {
        consume(self, self->size);
        self->need = -1;
    }
    return 0;
}

static int
length_next(Framer *self, PyObject **message)
{
    const char *base = self->data + self->start;
    Py_ssize_t need = self->need;
    if (need < 0) {
        if (self->size < 4) {
            return maybe_drop_at_eof(self);
        }
        uint32_t declared = big_endian_32(base);
        if ((uint64_t)declared > (uint64_t)self->max) {
            return length_too_large(self, declared);
        }
        self->need = need = (Py_ssize_t)declared;
    }
    if (self->size - 4 < need) {
        return maybe_drop_at_eof(self);
    }
    if ((*message = PyBytes_FromStringAndSize(base + 4, need)) == NULL) {
        return -1;
    }
    consume(self, 4 + need);
    self->need = -1;
    return 1;
}

static PyObject *
length_frame_chunk(Framer *self, const char *data, Py_ssize_t size)
{
    const char *end = data + size;
    if (size >= 4 && (uint64_t)big_endian_32(data) == (uint64_t)(size - 4)
            && size - 4 <= self->max) {  /* the usual read: one frame */
        return one_message(data + 4, size - 4);
    }
    PyObject *messages = PyList_New(0);
    if (messages == NULL) {
        return NULL;
    }
    while (end - data >= 4) {
        uint32_t declared = big_endian_32(data);
        if ((uint64_t)declared > (uint64_t)self->max) {
            if (hold(self, data, end - data) == 0) {  /* as drain() leaves it */
                length_too_large(self, declared);
            }
            goto error;
        }
        Py_ssize_t need = (Py_ssize_t)declared;
        if (end - data - 4 < need) {
            self->need = need;  /* the header is parsed: the body is pending */
            break;
        }
        PyObject *message = PyBytes_FromStringAndSize(data + 4, need);
        if (message == NULL) {
            goto error;
        }
        int appended = PyList_Append(messages, message);
        Py_DECREF(message);
        if (appended < 0) {
            goto error;
        }
        data += 4 + need;
    }
    if (data < end && hold(self, data, end - data) < 0) {
        self->need = -1;
        goto error;
    }
    return messages;
error:
    Py_DECREF(messages);
    return NULL;
}

static PyObject *
length_next_message(Framer *self, PyObject *Py_UNUSED(ignored))
{
    return next_message(self, length_next);
}

static PyObject *
length_feed_messages(Framer *self, PyObject *data)
{
    return feed_messages(self, data, length_next, length_frame_chunk);
}

/* feed_messages() of a line or length framer, from a buffer. */
PyObject *
framer_messages(Framer *self, const char *data, Py_ssize_t size)
{
    if (Py_IS_TYPE(self, &LineFramerType)) {
        return chunk_messages(self, data, size, line_next, line_frame_chunk);
    }
    return chunk_messages(self, data, size, length_next, length_frame_chunk);
}

static int
too_long_for_prefix(Py_ssize_t size)
{
    if ((uint64_t)size > MAX_LENGTH) {
        PyErr_Format(PyExc_ValueError,
                     "message of %zd bytes does not fit a 4-byte length prefix", size);
        return -1;
    }
    return 0;
}

/* The 4-byte header of ``message``, read as ``view``. Where the message is
 * no plain bytes or bytearray, its len() must fit too, as in Python. */
int
length_header(PyObject *message, Py_buffer *view, char header[4])
{
    Py_ssize_t size = view->len;
    if (too_long_for_prefix(size) < 0) {
        return -1;
    }
    if (view->obj != NULL && !PyByteArray_CheckExact(message)) {
        Py_ssize_t length = PyObject_Size(message);
        if (length < 0 || too_long_for_prefix(length) < 0) {
            return -1;
        }
    }
    header[0] = (char)(size >> 24);
    header[1] = (char)(size >> 16);
    header[2] = (char)(size >> 8);
    header[3] = (char)size;
    return 0;
}

static PyObject *
length_frame(Framer *self, PyObject *message)
{
    Py_buffer view;
    char header[4];
    if (get_bytes(message, &view) < 0) {
        return NULL;
    }
    PyObject *framed = NULL;
    if (length_header(message, &view, header) == 0
            && (framed = PyBytes_FromStringAndSize(NULL, 4 + view.len)) != NULL) {
        memcpy(PyBytes_AS_STRING(framed), header, 4);
        memcpy(PyBytes_AS_STRING(framed) + 4, view.buf, (size_t)view.len);
    }
    release_bytes(&view);
    return framed;
}

static PyObject *
length_frame_into(Framer *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    char header[4];
    if (frame_into_arguments(args, nargs, &view) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (length_header(args[1], &view, header) == 0) {
        result = append_framed(args[0], header, 4, &view, "", 0);
    }
    release_bytes(&view);
    return result;
}

/* -- the types ------------------------------------------------------------- */

static PyObject *
line_name(Framer *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString("line");
}

static PyObject *
length_name(Framer *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString("length");
}

#define FRAMER_METHODS(kind)                                                            \
    {"feed", (PyCFunction)framer_feed, METH_O,                                         \
     "feed(data): append data; b\"\" is EOF."},                                        \
    {"next_message", (PyCFunction)kind##_next_message, METH_NOARGS,                    \
     "next_message() -> bytes or NEED_DATA."},                                          \
    {"feed_messages", (PyCFunction)kind##_feed_messages, METH_O,                       \
     "feed_messages(data) -> list: feed(data), then every complete message."},         \
    {"frame", (PyCFunction)kind##_frame, METH_O,                                       \
     "frame(message) -> bytes: the message framed for the peer."},                     \
    {"frame_into", (PyCFunction)(void (*)(void))kind##_frame_into, METH_FASTCALL,      \
     "frame_into(buffer, message): append the framed message to a bytearray."},        \
    {"unread", (PyCFunction)framer_unread, METH_NOARGS,                                \
     "unread() -> bytes: a copy of the bytes held but not yet returned."},             \
    {NULL, NULL, 0, NULL}

static PyMethodDef line_methods[] = {FRAMER_METHODS(line)};
static PyMethodDef length_methods[] = {FRAMER_METHODS(length)};

static PyGetSetDef line_getset[] = {
    {"name", (getter)line_name, NULL, "The framing's name.", NULL},
    {"buffered", (getter)framer_buffered, NULL, "Bytes held but not yet returned.", NULL},
    {"_scanned", (getter)line_scanned, NULL, "Bytes searched for a newline in all.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef length_getset[] = {
    {"name", (getter)length_name, NULL, "The framing's name.", NULL},
    {"buffered", (getter)framer_buffered, NULL, "Bytes held but not yet returned.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject LineFramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "octopus.core._fastio.LineFramer",
    .tp_doc = "LineFramer(max_size): newline-delimited messages (octopus.core.framing).",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = framer_new,
    .tp_dealloc = (destructor)framer_dealloc,
    .tp_methods = line_methods,
    .tp_getset = line_getset,
};

PyTypeObject LengthFramerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "octopus.core._fastio.LengthFramer",
    .tp_doc = "LengthFramer(max_size): messages behind a 4-byte big-endian length "
              "(octopus.core.framing).",
    .tp_basicsize = sizeof(Framer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = framer_new,
    .tp_dealloc = (destructor)framer_dealloc,
    .tp_methods = length_methods,
    .tp_getset = length_getset,
};

/* ---- admission: the per-address table that every worker shares ------------
 *
 * The layout of octopus/coordination/admission.py: a header (int32 holder pid,
 * 4 bytes of padding), then 80-byte entries: key[48] (NUL-padded address),
 * int32 open connections, 4 bytes of padding, double tokens, double refilled,
 * double seen. Here the header is the lock itself: a process takes it by
 * swapping its pid for 0 (an atomic on MAP_SHARED memory works across
 * processes), and a waiter that has spun for ADM_DEAD_AFTER seconds takes it
 * back from a holder that no longer exists (killed mid-section). The pure
 * path guards the same table with a semaphore; one server never mixes them
 * (OCTOPUS_PURE_PYTHON is the same in every process of a server). */

#include <math.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#define ADM_HEADER 8
#define ADM_ENTRY 80
#define ADM_KEY 48
#define ADM_WINDOW 8
#define ADM_DEAD_AFTER 0.05

typedef struct {
    char key[ADM_KEY];
    int32_t count;
    int32_t pad;
    double tokens, refilled, seen;
} AdmEntry;

typedef struct {
    Py_buffer view;
    int32_t *lock;
    AdmEntry *entries;
    Py_ssize_t slots;  /* a power of two */
    char key[ADM_KEY];
    uint64_t start;
} AdmTable;

static double
adm_clock(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + now.tv_nsec / 1e9;
}

/* Open the table (a writable buffer) for key (bytes) under salt; 0, or -1 with an error. */
static int
adm_open(AdmTable *t, PyObject *table, PyObject *key, PyObject *salt)
{
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes");
        return -1;
    }
    uint64_t hash = PyLong_AsUnsignedLongLongMask(salt);
    if (hash == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (PyObject_GetBuffer(table, &t->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    Py_ssize_t slots = (t->view.len - ADM_HEADER) / ADM_ENTRY;
    if (slots < ADM_WINDOW || (slots & (slots - 1)) != 0) {
        PyBuffer_Release(&t->view);
        PyErr_SetString(PyExc_ValueError, "not an admission table");
        return -1;
    }
    t->lock = (int32_t *)t->view.buf;
    t->entries = (AdmEntry *)((char *)t->view.buf + ADM_HEADER);
    t->slots = slots;
    memset(t->key, 0, ADM_KEY);
    Py_ssize_t size = PyBytes_GET_SIZE(key);
    memcpy(t->key, PyBytes_AS_STRING(key), size < ADM_KEY ? (size_t)size : ADM_KEY);
    /* FNV-1a over the salt and the padded key: the salt is random per master,
     * so a client cannot aim its addresses at one window. */
    hash ^= 14695981039346656037ULL;
    for (int i = 0; i < ADM_KEY; i++) {
        hash = (hash ^ (unsigned char)t->key[i]) * 1099511628211ULL;
    }
    t->start = hash;
    return 0;
}

static void
adm_lock(AdmTable *t, int32_t pid)
{
    double since = 0.0;
    for (unsigned spins = 0;; spins++) {
        int32_t free_ = 0;
        if (__atomic_compare_exchange_n(t->lock, &free_, pid, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED)) {
            return;
        }
        if (spins < 64) {
            continue;
        }
        sched_yield();
        double now = adm_clock();
        if (since == 0.0) {
            since = now;
        }
        else if (now - since > ADM_DEAD_AFTER && free_ != 0
                 && kill(free_, 0) == -1 && errno == ESRCH) {
            /* The holder died inside: its section is void. */
            __atomic_compare_exchange_n(t->lock, &free_, 0, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED);
            since = 0.0;
        }
    }
}

static void
adm_close(AdmTable *t, int locked)
{
    if (locked) {
        __atomic_store_n(t->lock, 0, __ATOMIC_RELEASE);
    }
    PyBuffer_Release(&t->view);
}

static AdmEntry *
adm_find(AdmTable *t)
{
    for (int step = 0; step < ADM_WINDOW; step++) {
        AdmEntry *e = &t->entries[(t->start + step) & (t->slots - 1)];
        if (memcmp(e->key, t->key, ADM_KEY) == 0) {
            return e;
        }
    }
    return NULL;
}

/* admit(table, key, salt, now, limit, rate, pid) -> int: 0 admitted, 1 refused
 * for per_ip_connections, 2 for per_ip_rate; plus 4 when an entry was evicted. */
static PyObject *
fastio_admit(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "admit(table, key, salt, now, limit, rate, pid)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[3]);
    long long limit = PyLong_AsLongLong(args[4]);
    double rate = PyFloat_AsDouble(args[5]);
    long pid = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    AdmTable t;
    if (adm_open(&t, args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    adm_lock(&t, (int32_t)pid);
    int evicted = 0;
    AdmEntry *e = adm_find(&t);
    if (e == NULL) {
        /* A free entry (empty, or nothing open and a full bucket), else the
         * least recently seen one, evicted. */
        AdmEntry *oldest = NULL;
        for (int step = 0; step < ADM_WINDOW && e == NULL; step++) {
            AdmEntry *c = &t.entries[(t.start + step) & (t.slots - 1)];
            if (c->key[0] == 0 || (c->count == 0 && (
                    rate == 0.0 || c->tokens + (now - c->refilled) * rate >= 2 * rate))) {
                e = c;
            }
            else if (oldest == NULL || c->seen < oldest->seen) {
                oldest = c;
            }
        }
        if (e == NULL) {
            e = oldest;
            evicted = 4;
        }
        memcpy(e->key, t.key, ADM_KEY);
        e->count = 0;
        e->tokens = INFINITY;
        e->refilled = now;
    }
    int verdict = 0;
    e->seen = now;
    if (rate != 0.0) {
        double tokens = e->tokens + (now - e->refilled) * rate;
        e->tokens = tokens < 2 * rate ? tokens : 2 * rate;
        e->refilled = now;
        if (e->tokens < 1.0) {
            verdict = 2;
        }
    }
    if (verdict == 0 && limit != 0 && e->count >= limit) {
        verdict = 1;
    }
    if (verdict == 0) {
        e->count += 1;
        if (rate != 0.0) {
            e->tokens -= 1.0;
        }
    }
    adm_close(&t, 1);
    return PyLong_FromLong(verdict | evicted);
}

/* give_back(table, key, salt, pid): one connection of key ended. */
static PyObject *
fastio_give_back(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "give_back(table, key, salt, pid)");
        return NULL;
    }
    long pid = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    AdmTable t;
    if (adm_open(&t, args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    adm_lock(&t, (int32_t)pid);
    AdmEntry *e = adm_find(&t);
    if (e != NULL && e->count > 0) {
        e->count -= 1;
    }
    adm_close(&t, 1);
    Py_RETURN_NONE;
}

/* open_connections(table, key, salt) -> int (unlocked: a look, for tests and status). */
static PyObject *
fastio_open_connections(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "open_connections(table, key, salt)");
        return NULL;
    }
    AdmTable t;
    if (adm_open(&t, args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    AdmEntry *e = adm_find(&t);
    long count = e == NULL ? 0 : e->count;
    adm_close(&t, 0);
    return PyLong_FromLong(count);
}

/* lock(table, pid): take the table's lock and keep it (what a worker killed
 * mid-section leaves behind; for the test that takes it back). */
static PyObject *
fastio_lock(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lock(table, pid)");
        return NULL;
    }
    long pid = PyLong_AsLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    AdmTable t;
    PyObject *none_key = PyBytes_FromStringAndSize("", 0);
    PyObject *zero = PyLong_FromLong(0);
    int opened = none_key && zero ? adm_open(&t, args[0], none_key, zero) : -1;
    Py_XDECREF(none_key);
    Py_XDECREF(zero);
    if (opened < 0) {
        return NULL;
    }
    adm_lock(&t, (int32_t)pid);
    adm_close(&t, 0);
    Py_RETURN_NONE;
}

/* bind(need_data, too_large): what next_message() returns when a message is
 * incomplete, and the exception for one over the limit (framing.py's own). */
static PyObject *
fastio_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyExceptionClass_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "bind(need_data, too_large_exception_class)");
        return NULL;
    }
    Py_XSETREF(need_data, Py_NewRef(args[0]));
    Py_XSETREF(too_large, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef fastio_methods[] = {
    {"read", (PyCFunction)(void (*)(void))fastio_read, METH_FASTCALL,
     "read(fd, size) -> bytes: os.read for a non-blocking descriptor, GIL held."},
    {"write", (PyCFunction)(void (*)(void))fastio_write, METH_FASTCALL,
     "write(fd, data) -> int: os.write for a non-blocking descriptor, GIL held."},
    {"accept", fastio_accept, METH_O,
     "accept(fd) -> (fd, address): a non-blocking connection from a TCP listener."},
    {"bind", (PyCFunction)(void (*)(void))fastio_bind, METH_FASTCALL,
     "bind(need_data, too_large): the framers' NEED_DATA and MessageTooLarge."},
    {"admit", (PyCFunction)(void (*)(void))fastio_admit, METH_FASTCALL,
     "admit(table, key, salt, now, limit, rate, pid) -> int: the admission table's verdict."},
    {"give_back", (PyCFunction)(void (*)(void))fastio_give_back, METH_FASTCALL,
     "give_back(table, key, salt, pid): one connection of key ended."},
    {"open_connections", (PyCFunction)(void (*)(void))fastio_open_connections, METH_FASTCALL,
     "open_connections(table, key, salt) -> int: what the table counts for key."},
    {"lock", (PyCFunction)(void (*)(void))fastio_lock, METH_FASTCALL,
     "lock(table, pid): take the admission table's lock and keep it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastio_module = {
    PyModuleDef_HEAD_INIT, "octopus.core._fastio",
    "read() and write() on non-blocking descriptors without releasing the GIL; "
    "the line and length framers; the admission table; the loop's dispatch and send().",
    -1, fastio_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    if (PyType_Ready(&LineFramerType) < 0 || PyType_Ready(&LengthFramerType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&fastio_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "LineFramer", (PyObject *)&LineFramerType) < 0
            || PyModule_AddObjectRef(module, "LengthFramer", (PyObject *)&LengthFramerType) < 0
            || hotpath_init(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
