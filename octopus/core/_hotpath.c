/* The message path in C: the loop's dispatch of epoll events, the read, the
 * framing and the call into receive(), and SocketConnection.send().
 *
 * octopus.core.connection stays the one description of what a connection
 * does; this file does the common case of two of its methods without a
 * Python frame, and hands everything else to them:
 *
 * - Poller.dispatch() calls each ready fd's callback, as Loop.run() does in
 *   Python, except where the callback is a connection's own
 *   SocketConnection._on_events: then it reads, frames and calls receive()
 *   here, for an OPEN connection whose framer is none, line or length, whose
 *   worker keeps its counters in a Tally. Anything else (closing, lingering,
 *   TLS, PROXY, WebSocket, a test's stand-in worker) is the Python method's.
 * - send() writes here for an OPEN connection with the same framers: at once
 *   when nothing is pending, appended to the buffer while output waits or
 *   replies are corked. Whatever is unusual goes to the Python send().
 *
 * A connection's fields are SocketConnection's __slots__: bind_connection()
 * reads each slot's offset from its member descriptor, which every subclass
 * keeps (a subclass's own slots, or its __dict__, come after the base's).
 * The counters are a Tally's C fields, the base of the worker.
 */
#include "_fastio.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#if PY_VERSION_HEX >= 0x030C0000
#define MEMBER_OBJECT Py_T_OBJECT_EX
#define MEMBER_LONGLONG Py_T_LONGLONG
#else
#include <structmember.h>
#define MEMBER_OBJECT T_OBJECT_EX
#define MEMBER_LONGLONG T_LONGLONG
#endif

#define MAX_EVENTS 1024
#define READABLE (EPOLLIN | EPOLLERR | EPOLLHUP)

/* -- Tally: the worker's message and byte counters ------------------------ */

typedef struct {
    PyObject_HEAD
    long long messages_in, messages_out, bytes_in, bytes_out;
} Tally;

static PyMemberDef tally_members[] = {
    {"messages_in", MEMBER_LONGLONG, offsetof(Tally, messages_in), 0, "Messages received."},
    {"messages_out", MEMBER_LONGLONG, offsetof(Tally, messages_out), 0, "Messages sent."},
    {"bytes_in", MEMBER_LONGLONG, offsetof(Tally, bytes_in), 0, "Bytes read from clients."},
    {"bytes_out", MEMBER_LONGLONG, offsetof(Tally, bytes_out), 0,
     "Bytes the kernel took for clients."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "octopus.core._fastio.Tally",
    .tp_doc = "The counters of the message path, as C fields (the worker's base).",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_members = tally_members,
};

/* -- what bind_connection() learns of SocketConnection -------------------- */

static struct {
    Py_ssize_t fd, state, framer, wbuf, corked, worker, idle_timer, last_input, events,
        wreserved, aio;
} at;  /* the slots' offsets */

static PyObject *plain_on_events;  /* SocketConnection._on_events, the function */
static PyObject *python_send;      /* SocketConnection.send as written in Python */
static PyObject *state_open, *state_closing;
static PyObject *s_receive, *s_receive_failed, *s_frame_failed, *s_lost, *s_peer_eof,
    *s_flush, *s_unsent, *s_output_grew;

struct slot {
    const char *name;
    Py_ssize_t *offset;
};
static int slot_offsets(PyObject *cls, struct slot *slots);

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

static void
set_slot(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject *old = SLOT(obj, offset);
    SLOT(obj, offset) = Py_NewRef(value);
    Py_XDECREF(old);
}

/* The raised exception, normalised, with its traceback attached. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

/* asyncio's table of the task each loop runs now, which _enter_task and
 * _leave_task keep and current_task() reads (bind_async() gives it). */
static PyObject *current_tasks;

/* The loop whose entry in current_tasks a first step that completed left
 * there (see first_step_of), or NULL: removed before any other Python code
 * runs, by leave(), which every call out of this file makes first. Per
 * thread, as loops are: another thread's loop may run wherever the GIL can
 * pass (a collection's finalizers, too). */
static _Thread_local PyObject *entered;

/* _leave_task for the last first step; an exception pending stays so. */
static int
leave(void)
{
    PyObject *aloop = entered;
    if (aloop == NULL) {
        return 0;
    }
    entered = NULL;
    PyObject *pending = PyErr_Occurred() ? take_exception() : NULL;
    int result = PyDict_DelItem(current_tasks, aloop);
    Py_DECREF(aloop);
    if (pending != NULL) {
        if (result < 0) {
            PyErr_Clear();
        }
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(pending);
#else
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(pending)), pending,
                      PyException_GetTraceback(pending));
#endif
    }
    return result;
}

/* conn.name(*args): 0, or -1 with an exception set. */
static int
call_method(PyObject *conn, PyObject *name, PyObject *arg)
{
    if (leave() < 0) {
        return -1;
    }
    PyObject *args[3] = {NULL, conn, arg};
    size_t nargs = (arg == NULL ? 1 : 2) | PY_VECTORCALL_ARGUMENTS_OFFSET;
    PyObject *result = PyObject_VectorcallMethod(name, args + 1, nargs, NULL);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* function(*args), where args[-1] may be borrowed for the call: 0, or -1
 * with an exception set. */
static int
call(PyObject *function, PyObject *const *args, size_t nargs)
{
    if (leave() < 0) {
        return -1;
    }
    PyObject *result = PyObject_Vectorcall(function, (PyObject **)args,
                                           nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* conn.name(exception) with the exception raised now. */
static int
pass_exception(PyObject *conn, PyObject *name)
{
    PyObject *exc = take_exception();
    int result = call_method(conn, name, exc);
    Py_DECREF(exc);
    return result;
}

/* After a hook raised: an Exception is the connection's (logged, it ends);
 * anything else (SystemExit, KeyboardInterrupt) goes on up, as in Python. */
static int
hook_failed(PyObject *conn)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    return pass_exception(conn, s_receive_failed);
}

static int
receive(PyObject *conn, PyObject *message)
{
    return call_method(conn, s_receive, message) < 0 ? hook_failed(conn) : 0;
}

enum { RAW, LINE, LENGTH, OTHER };

static int
framing_of(PyObject *framer)
{
    if (framer == Py_None) {
        return RAW;
    }
    if (framer != NULL && Py_IS_TYPE(framer, &LineFramerType)) {
        return LINE;
    }
    if (framer != NULL && Py_IS_TYPE(framer, &LengthFramerType)) {
        return LENGTH;
    }
    return OTHER;
}

/* The connection's worker if it keeps a Tally, else NULL. */
static Tally *
tally_of(PyObject *conn)
{
    PyObject *worker = SLOT(conn, at.worker);
    return worker != NULL && PyObject_TypeCheck(worker, &TallyType) ? (Tally *)worker : NULL;
}

/* An int's value: a descriptor, a size, a mask (each fits one digit but a size). */
static inline Py_ssize_t
int_value(PyObject *value)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)value)) {
        return PyUnstable_Long_CompactValue((PyLongObject *)value);
    }
#else
    if (Py_SIZE(value) == 1) {
        return (Py_ssize_t)((PyLongObject *)value)->ob_digit[0];
    }
#endif
    return PyLong_AsSsize_t(value);
}

static int
slot_fd(PyObject *conn)
{
    PyObject *fd = SLOT(conn, at.fd);
    if (fd == NULL || !PyLong_CheckExact(fd)) {
        PyErr_SetString(PyExc_TypeError, "connection without a descriptor");
        return -1;
    }
    return (int)int_value(fd);
}

static Py_ssize_t
slot_size(PyObject *conn, Py_ssize_t offset)
{
    PyObject *value = SLOT(conn, offset);
    return value != NULL && PyLong_CheckExact(value) ? int_value(value) : -1;
}

/* Output waits in the connection's buffer. */
static int
output_pending(PyObject *conn)
{
    PyObject *wbuf = SLOT(conn, at.wbuf);
    if (wbuf == NULL) {
        return 0;
    }
    return PyByteArray_CheckExact(wbuf) ? PyByteArray_GET_SIZE(wbuf) > 0 : PyObject_IsTrue(wbuf);
}

/* -- the read side: SocketConnection._on_events, OPEN and readable -------- */

/* on_events(conn, mask): the Python method does it. */
static int
in_python(PyObject *on_events, PyObject *conn, uint32_t mask)
{
    PyObject *args[3] = {NULL, conn, PyLong_FromUnsignedLong(mask)};
    if (args[2] == NULL) {
        return -1;
    }
    int result = call(on_events, args + 1, 2);
    Py_DECREF(args[2]);
    return result;
}

/* One read into fastio_buffer: its size, or -1 for nothing to read (EAGAIN),
 * or -2 after the error went to conn._lost() (-3: and that raised). */
static ssize_t
read_input(PyObject *conn, Tally *tally, PyObject *now)
{
    int fd = slot_fd(conn);
    if (fd == -1 && PyErr_Occurred()) {
        return -3;
    }
    ssize_t n;
    while ((n = read(fd, fastio_buffer, BUFFER_SIZE)) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return -1;
        }
        if (fastio_fail() < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OSError)) {
                return -3;
            }
            return pass_exception(conn, s_lost) < 0 ? -3 : -2;
        }
    }
    tally->bytes_in += n;
    if (SLOT(conn, at.idle_timer) != Py_None) {
        set_slot(conn, at.last_input, now);
    }
    return n;
}

/* The end of every _on_events: in CLOSING, an error or hang-up must surface
 * through a write attempt. */
static int
flush_if_due(PyObject *conn, uint32_t mask)
{
    if (output_pending(conn) && (mask & EPOLLOUT || SLOT(conn, at.state) == state_closing)) {
        return call_method(conn, s_flush, NULL);
    }
    return 0;
}

/* The messages of one read through a line or length framer, as
 * SocketConnection._on_framed_input delivers them. */
static int
framed_input(PyObject *conn, Tally *tally, Framer *framer, Py_ssize_t n)
{
    PyObject *messages = framer_messages(framer, fastio_buffer, n);
    if (messages == NULL) {
        return PyErr_ExceptionMatches(too_large) ? pass_exception(conn, s_frame_failed) : -1;
    }
    Py_ssize_t count = PyList_GET_SIZE(messages);
    int result = 0;
    if (count == 1) {
        tally->messages_in++;
        result = receive(conn, PyList_GET_ITEM(messages, 0));
    }
    else if (count > 1) {
        /* Replies to a batch are corked into one write. */
        tally->messages_in += count;
        set_slot(conn, at.corked, Py_True);
        for (Py_ssize_t i = 0; i < count && SLOT(conn, at.state) == state_open; i++) {
            if (call_method(conn, s_receive, PyList_GET_ITEM(messages, i)) < 0) {
                result = hook_failed(conn);
                break;
            }
        }
        set_slot(conn, at.corked, Py_False);
        if (result == 0 && output_pending(conn) && !(slot_size(conn, at.events) & EPOLLOUT)) {
            result = call_method(conn, s_flush, NULL);
        }
    }
    Py_DECREF(messages);
    if (result == 0 && n == 0) {
        result = call_method(conn, s_peer_eof, NULL);
    }
    return result;
}

static int
on_events(PyObject *conn, uint32_t mask, PyObject *now)
{
    Tally *tally = tally_of(conn);
    PyObject *framer = SLOT(conn, at.framer);
    int framing = framing_of(framer);
    if (!(mask & READABLE) || SLOT(conn, at.state) != state_open || tally == NULL
            || framing == OTHER) {
        return in_python(plain_on_events, conn, mask);
    }
    ssize_t n = read_input(conn, tally, now);
    if (n < 0) {
        return n == -3 ? -1 : 0;
    }
    int result;
    if (framing != RAW) {
        result = framed_input(conn, tally, (Framer *)framer, n);
    }
    else if (n > 0) {
        tally->messages_in++;
        PyObject *data = PyBytes_FromStringAndSize(fastio_buffer, n);
        if (data == NULL) {
            return -1;
        }
        result = receive(conn, data);
        Py_DECREF(data);
    }
    else {
        result = call_method(conn, s_peer_eof, NULL);
    }
    return result < 0 ? -1 : flush_if_due(conn, mask);
}

/* -- the read side of async classes (octopus.core.asynchooks) ------------
 *
 * asynchooks._on_events in C for its common case: an OPEN connection with
 * no hook task pending and no backlog. A receive() that returns a coroutine
 * gets its first step here, as asynchooks._first_step does it: inside the
 * connection's driver task (entered as the loop's current task) and its
 * context; a step that suspends, fails, or finds no driver yet is handed to
 * the Python functions. */

static struct {
    Py_ssize_t aloop, backlog, context, current, driver;
} as;  /* AsyncState's slots */

static PyObject *async_on_events, *first_step, *suspended, *step_failed, *deliver;

static int
first_step_of(PyObject *conn, PyObject *aio, PyObject *coro)
{
    PyObject *driver = SLOT(aio, as.driver);
    if (driver == NULL || driver == Py_None) {
        PyObject *args[4] = {NULL, conn, aio, coro};
        return call(first_step, args + 1, 3);
    }
    PyObject *context = SLOT(aio, as.context), *aloop = SLOT(aio, as.aloop);
    /* _enter_task(aloop, driver), as a Task's step does; no task runs now
     * (dispatch is never called from a task). Where the last first step
     * left its entry, it is replaced: cheaper than a delete and an insert. */
    if (entered != aloop && leave() < 0) {
        return -1;
    }
    if (PyDict_SetItem(current_tasks, aloop, driver) < 0) {
        return -1;
    }
    PyObject *held = entered != NULL ? entered : Py_NewRef(aloop);
    entered = NULL;  /* the step runs as the task: nothing to leave in it */
    /* Held for the step, which may end the connection and drop its state. */
    Py_INCREF(driver);
    Py_INCREF(context);
    PyObject *yielded = NULL, *exc = NULL;
    PySendResult sent = PYGEN_ERROR;
    int result = PyContext_Enter(context);
    if (result == 0) {
        sent = PyIter_Send(coro, Py_None, &yielded);
        if (sent == PYGEN_ERROR) {
            exc = take_exception();
        }
        result = PyContext_Exit(context);
    }
    /* _leave_task: now, unless the coroutine returned; then by the next
     * call out of this file (leave()). */
    entered = held;
    if (!(result == 0 && sent == PYGEN_RETURN) && leave() < 0) {
        result = -1;
    }
    if (result == 0 && exc != NULL) {
        PyObject *args[3] = {NULL, conn, exc};
        result = call(step_failed, args + 1, 2);
    }
    else if (result == 0 && sent == PYGEN_NEXT) {
        PyObject *args[6] = {NULL, conn, aio, driver, coro, yielded};
        result = call(suspended, args + 1, 5);
    }
    Py_XDECREF(exc);
    Py_XDECREF(yielded);
    Py_DECREF(driver);
    Py_DECREF(context);
    return result;
}

/* The class's receive() is an async def function: calling it makes a
 * coroutine and runs no Python code. (An instance attribute of that name
 * would be called, but is not looked for here.) */
static int
receive_is_async(PyObject *conn)
{
    PyObject *function = _PyType_Lookup(Py_TYPE(conn), s_receive);
    return function != NULL && PyFunction_Check(function)
           && ((PyCodeObject *)PyFunction_GET_CODE(function))->co_flags & CO_COROUTINE;
}

static int
async_receive(PyObject *conn, PyObject *aio, PyObject *message)
{
    if (entered != NULL && !receive_is_async(conn) && leave() < 0) {
        return -1;
    }
    PyObject *args[3] = {NULL, conn, message};
    PyObject *result = PyObject_VectorcallMethod(s_receive, args + 1,
                                                 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (result == NULL) {
        return hook_failed(conn);
    }
    int done = PyCoro_CheckExact(result) ? first_step_of(conn, aio, result) : 0;
    Py_DECREF(result);
    return done;
}

static int
on_async_events(PyObject *conn, uint32_t mask, PyObject *now)
{
    Tally *tally = tally_of(conn);
    PyObject *framer = SLOT(conn, at.framer), *aio = SLOT(conn, at.aio);
    int framing = framing_of(framer);
    PyObject *backlog = aio == NULL ? NULL : SLOT(aio, as.backlog);
    if (!(mask & READABLE) || SLOT(conn, at.state) != state_open || tally == NULL
            || framing == OTHER || backlog == NULL || SLOT(aio, as.current) != Py_None
            || Py_SIZE(backlog) != 0) {  /* a deque: its length */
        return in_python(async_on_events, conn, mask);
    }
    Py_INCREF(aio);
    ssize_t n = read_input(conn, tally, now);
    int result = n == -3 ? -1 : 0;
    if (framing == RAW && n > 0) {
        tally->messages_in++;
        PyObject *data = PyBytes_FromStringAndSize(fastio_buffer, n);
        result = data == NULL ? -1 : async_receive(conn, aio, data);
        Py_XDECREF(data);
    }
    else if (n >= 0) {
        PyObject *messages = framing == RAW ? PyList_New(0)
                                            : framer_messages((Framer *)framer, fastio_buffer, n);
        if (messages == NULL) {
            result = framing != RAW && PyErr_ExceptionMatches(too_large)
                     ? pass_exception(conn, s_frame_failed) : -1;
        }
        else if (PyList_GET_SIZE(messages) == 1 && n > 0) {
            tally->messages_in++;
            result = async_receive(conn, aio, PyList_GET_ITEM(messages, 0));
        }
        else {
            PyObject *args[4] = {NULL, conn, messages, n == 0 ? Py_True : Py_False};
            result = call(deliver, args + 1, 3);
        }
        Py_XDECREF(messages);
    }
    Py_DECREF(aio);
    return result < 0 ? -1 : flush_if_due(conn, mask);
}

/* bind_async(state_cls, on_events, first_step, suspended, step_failed,
 * deliver, current_tasks): octopus.core.asynchooks's parts, and asyncio's
 * table of current tasks. */
static PyObject *
fastio_bind_async(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyType_Check(args[0]) || !PyFunction_Check(args[1])
            || !PyDict_CheckExact(args[6])) {
        PyErr_SetString(PyExc_TypeError, "bind_async(state_cls, on_events, first_step, "
                                         "suspended, step_failed, deliver, current_tasks)");
        return NULL;
    }
    struct slot slots[] = {{"aloop", &as.aloop}, {"backlog", &as.backlog},
                           {"context", &as.context}, {"current", &as.current},
                           {"driver", &as.driver}, {NULL, NULL}};
    if (slot_offsets(args[0], slots) < 0) {
        return NULL;
    }
    PyObject **parts[] = {&async_on_events, &first_step, &suspended, &step_failed, &deliver,
                          &current_tasks};
    for (int i = 0; i < 6; i++) {
        Py_XSETREF(*parts[i], Py_NewRef(args[i + 1]));
    }
    Py_RETURN_NONE;
}

/* -- Poller: epoll_wait, then each event to its callback ------------------ */

typedef struct {
    PyObject_HEAD
    int epfd;
    int ready;
    struct epoll_event events[MAX_EVENTS];
} Poller;

static PyObject *
poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int epfd;
    if (!PyArg_ParseTuple(args, "i:Poller", &epfd)) {
        return NULL;
    }
    Poller *self = (Poller *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->epfd = epfd;
    }
    return (PyObject *)self;
}

/* wait(timeout) -> int: epoll_wait for at most timeout seconds (rounded up
 * to a millisecond, as select.epoll.poll does; negative: no limit). The GIL
 * is released while it waits. A signal ends the wait early with 0 events,
 * after its Python handler ran. */
static PyObject *
poller_wait(Poller *self, PyObject *timeout)
{
    double seconds = PyFloat_AsDouble(timeout);
    if (seconds == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    int ms = seconds < 0 ? -1 : seconds * 1000.0 >= INT_MAX ? INT_MAX : (int)ceil(seconds * 1000.0);
    int n, error;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(self->epfd, self->events, MAX_EVENTS, ms);
    error = errno;
    Py_END_ALLOW_THREADS
    if (n < 0) {
        errno = error;
        if (fastio_fail() < 0) {
            return NULL;
        }
        n = 0;
    }
    self->ready = n;
    return PyLong_FromLong(n);
}

/* dispatch(callbacks, now): the events of the last wait(), each to
 * callbacks[fd](mask), looked up when its turn comes (an earlier callback
 * may have unregistered it); a connection's _on_events is done here. */
static PyObject *
poller_dispatch(Poller *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "dispatch(callbacks: dict, now: float)");
        return NULL;
    }
    PyObject *callbacks = args[0], *now = args[1];
    int ready = self->ready;
    self->ready = 0;
    for (int i = 0; i < ready; i++) {
        uint32_t mask = self->events[i].events;
        PyObject *key = PyLong_FromLong(self->events[i].data.fd);
        if (key == NULL) {
            leave();
            return NULL;
        }
        PyObject *callback = PyDict_GetItemWithError(callbacks, key);
        Py_DECREF(key);
        if (callback == NULL) {
            if (PyErr_Occurred()) {
                leave();
                return NULL;
            }
            continue;
        }
        Py_INCREF(callback);
        int result;
        PyObject *function = PyMethod_Check(callback) ? PyMethod_GET_FUNCTION(callback) : NULL;
        if (function != NULL && function == plain_on_events) {
            result = on_events(PyMethod_GET_SELF(callback), mask, now);
        }
        else if (function != NULL && function == async_on_events) {
            result = on_async_events(PyMethod_GET_SELF(callback), mask, now);
        }
        else if (leave() < 0) {
            result = -1;
        }
        else {
            PyObject *events = PyLong_FromUnsignedLong(mask);
            PyObject *returned = events == NULL ? NULL : PyObject_CallOneArg(callback, events);
            Py_XDECREF(events);
            result = returned == NULL ? -1 : 0;
            Py_XDECREF(returned);
        }
        Py_DECREF(callback);
        if (result < 0) {
            leave();
            return NULL;
        }
    }
    if (leave() < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef poller_methods[] = {
    {"wait", (PyCFunction)poller_wait, METH_O,
     "wait(timeout) -> int: epoll_wait; the events wait for dispatch()."},
    {"dispatch", (PyCFunction)(void (*)(void))poller_dispatch, METH_FASTCALL,
     "dispatch(callbacks, now): each event of the last wait() to its callback."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "octopus.core._fastio.Poller",
    .tp_doc = "Poller(epfd): waits on an epoll fd and dispatches its events.",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = poller_new,
    .tp_methods = poller_methods,
};

/* -- send() --------------------------------------------------------------- */

static PyObject *
send_in_python(PyObject *conn, PyObject *data)
{
    PyObject *args[3] = {NULL, conn, data};
    return PyObject_Vectorcall(python_send, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* What a partial write left: framed[sent:], as bytes. */
static PyObject *
unsent(struct iovec *iov, int count, Py_ssize_t sent)
{
    Py_ssize_t total = 0;
    for (int i = 0; i < count; i++) {
        total += (Py_ssize_t)iov[i].iov_len;
    }
    PyObject *rest = PyBytes_FromStringAndSize(NULL, total - sent);
    if (rest == NULL) {
        return NULL;
    }
    char *end = PyBytes_AS_STRING(rest);
    for (int i = 0; i < count; i++) {
        Py_ssize_t size = (Py_ssize_t)iov[i].iov_len;
        Py_ssize_t skip = sent < size ? sent : size;
        memcpy(end, (char *)iov[i].iov_base + skip, (size_t)(size - skip));
        end += size - skip;
        sent -= skip;
    }
    return rest;
}

static PyObject *
conn_send(PyObject *conn, PyObject *data)
{
    Tally *tally = tally_of(conn);
    int framing = framing_of(SLOT(conn, at.framer));
    PyObject *wbuf = SLOT(conn, at.wbuf), *corked = SLOT(conn, at.corked);
    if (SLOT(conn, at.state) != state_open || tally == NULL || framing == OTHER
            || wbuf == NULL || !PyByteArray_CheckExact(wbuf) || corked == NULL) {
        return send_in_python(conn, data);
    }
    Py_buffer view;
    if (get_bytes(data, &view) < 0) {
        return NULL;
    }
    char header[4];
    Py_ssize_t head = 0, tail = framing == LINE;
    if (framing == LENGTH) {
        if (length_header(data, &view, header) < 0) {
            release_bytes(&view);
            return NULL;
        }
        head = 4;
    }
    tally->messages_out++;
    if (PyByteArray_GET_SIZE(wbuf) || corked != Py_False) {
        /* Output already waits, or replies are being gathered: append. */
        PyObject *appended = append_framed(wbuf, header, head, &view, "\n", tail);
        release_bytes(&view);
        if (appended == NULL) {
            return NULL;
        }
        Py_DECREF(appended);
        if (PyByteArray_GET_SIZE(wbuf) > slot_size(conn, at.wreserved)
                && call_method(conn, s_output_grew, NULL) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    struct iovec iov[3];
    int count = 0;
    if (head) {
        iov[count++] = (struct iovec){header, 4};
    }
    iov[count++] = (struct iovec){view.buf, (size_t)view.len};
    if (tail) {
        iov[count++] = (struct iovec){"\n", 1};
    }
    int fd = slot_fd(conn);
    ssize_t sent = -1;
    int result = 0;
    if (fd != -1 || !PyErr_Occurred()) {
        while ((sent = count == 1 ? write(fd, view.buf, (size_t)view.len)
                                  : writev(fd, iov, count)) < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                sent = 0;
                break;
            }
            if (fastio_fail() < 0) {
                result = PyErr_ExceptionMatches(PyExc_OSError) ? pass_exception(conn, s_lost) : -1;
                break;
            }
        }
    }
    else {
        result = -1;
    }
    if (sent >= 0) {
        tally->bytes_out += sent;
        if (sent < head + view.len + tail) {
            PyObject *rest = unsent(iov, count, sent);
            result = rest == NULL ? -1 : call_method(conn, s_unsent, rest);
            Py_XDECREF(rest);
        }
    }
    release_bytes(&view);
    if (result < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef send_def = {
    "send", (PyCFunction)conn_send, METH_O,
    "Queue ``data`` (framed as this connection frames); never blocks.",
};

/* -- bind_connection ------------------------------------------------------ */

/* Each named slot's offset, read from its member descriptor in cls. */
static int
slot_offsets(PyObject *cls, struct slot *slots)
{
    for (; slots->name != NULL; slots++) {
        PyObject *descriptor = PyObject_GetAttrString(cls, slots->name);
        if (descriptor == NULL) {
            return -1;
        }
        int ok = Py_IS_TYPE(descriptor, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descriptor)->d_member->type == MEMBER_OBJECT;
        if (ok) {
            *slots->offset = ((PyMemberDescrObject *)descriptor)->d_member->offset;
        }
        Py_DECREF(descriptor);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s is no slot", slots->name);
            return -1;
        }
    }
    return 0;
}

/* bind_connection(cls, on_events, send, OPEN, CLOSING) -> send: learn
 * SocketConnection's slots, its _on_events function and its Python send();
 * return the compiled send(), a method of cls. */
static PyObject *
fastio_bind_connection(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyType_Check(args[0]) || !PyFunction_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "bind_connection(cls, on_events, send, OPEN, CLOSING)");
        return NULL;
    }
    PyObject *cls = args[0];
    struct slot slots[] = {
        {"_fd", &at.fd}, {"_state", &at.state}, {"_framer", &at.framer}, {"_wbuf", &at.wbuf},
        {"_corked", &at.corked}, {"_worker", &at.worker}, {"_idle_timer", &at.idle_timer},
        {"_last_input", &at.last_input}, {"_events", &at.events},
        {"_wreserved", &at.wreserved}, {"_aio", &at.aio}, {NULL, NULL}};
    if (slot_offsets(cls, slots) < 0) {
        return NULL;
    }
    Py_XSETREF(plain_on_events, Py_NewRef(args[1]));
    Py_XSETREF(python_send, Py_NewRef(args[2]));
    Py_XSETREF(state_open, Py_NewRef(args[3]));
    Py_XSETREF(state_closing, Py_NewRef(args[4]));
    return PyDescr_NewMethod((PyTypeObject *)cls, &send_def);
}

PyMethodDef hotpath_methods[] = {
    {"bind_connection", (PyCFunction)(void (*)(void))fastio_bind_connection, METH_FASTCALL,
     "bind_connection(cls, on_events, send, OPEN, CLOSING) -> the compiled send()."},
    {"bind_async", (PyCFunction)(void (*)(void))fastio_bind_async, METH_FASTCALL,
     "bind_async(state_cls, on_events, first_step, suspended, step_failed, deliver, "
     "current_tasks): the async classes' read side."},
    {NULL, NULL, 0, NULL},
};

int
hotpath_init(PyObject *module)
{
    struct { PyObject **name; const char *text; } names[] = {
        {&s_receive, "receive"}, {&s_receive_failed, "_receive_failed"},
        {&s_frame_failed, "_frame_failed"}, {&s_lost, "_lost"}, {&s_peer_eof, "_peer_eof"},
        {&s_flush, "_flush"}, {&s_unsent, "_unsent"}, {&s_output_grew, "_output_grew"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&TallyType) < 0 || PyType_Ready(&PollerType) < 0
            || PyModule_AddObjectRef(module, "Tally", (PyObject *)&TallyType) < 0
            || PyModule_AddObjectRef(module, "Poller", (PyObject *)&PollerType) < 0) {
        return -1;
    }
    return PyModule_AddFunctions(module, hotpath_methods);
}
