"""ExpertRouter: serve requests for several tasks from one model.

`run(task, texts)` runs the DoE steps: plug the task's expert (mask, soft prompt, head), run
inference, unplug it (back to the router's keep-everything patch, see below).
`run_mixed([(task, text), ...])` serves requests of several tasks in one forward pass per batch,
each row on its own expert (doe_kernels.mixed). `submit(task, text)` queues one request for a
worker thread that gathers the requests arriving within `batch_window` seconds (up to
`batch_size`) into one mixed batch: dynamic batching for many clients.

The router keeps the model patched with a keep-everything mask between requests, so plugging and
unplugging an expert only swaps index tensors and head Parameters' storage; `close()` (or leaving
the `with` block) stops the worker and unpatches the model. Requests may come from several threads
in any order: every forward pass runs on the router's one compute thread, one at a time, so each
answer equals what that task's expert gives alone. Routers on one model share its lock, so their
forward passes and swaps never interleave either (each on its own compute thread: one router
serves faster, see below).

Why one compute thread: PyTorch's CPU ops run in parallel through OpenMP, whose worker pool
belongs to the thread that calls them. Called from many threads, GNU OpenMP (PyTorch's Linux
wheels) keeps a pool for each and, once their threads outnumber the cores, stops keeping idle
workers spinning, so that each small op (a LayerNorm, an add) waits for its workers to wake: on a
2-core Intel Xeon the serial router served 8 client threads 1.6-1.8x faster through one compute
thread than in the clients' threads, and mixed batching 1.4x faster than in its batching thread
after the main thread had run the model. The main thread's idle pool counts too, so the router
frees it (`_free_openmp_pool`) when it is built there and whenever a request comes from there;
other threads that run the model while the router serves bring the slowdown back
(docs/pipeline.md). Their forward passes take turns with the router's (_ModelGuard), and a fork
waits for the pass in progress. The caller's thread-local torch settings (autocast, grad mode,
the current CUDA device and stream) do not reach the compute thread: cast the model to the dtype
it serves in.
"""
import contextlib
import ctypes
import functools
import numbers
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from concurrent.futures import Future

import torch

from doe_kernels.backends import (BackendUnavailableError, available_backends,
                                  check_backend_name)
from doe_kernels.expert import Expert, NoTokenError, check_batch_size
from doe_kernels.mask import ExpertMask
from doe_kernels.mixed import mixed_logits
from doe_kernels.patching import (current_mask, is_patched, patch, unpatch,
                                  unwrap_compiled)


class ExpertRouter:
    def __init__(self, model, tokenizer, backend: str = "auto", batch_size: int = 32,
                 batch_window: float = 0.005):
        self.model, self.tokenizer = model, tokenizer
        self.backend, self.batch_size, self.batch_window = backend, batch_size, batch_window
        self._experts: dict[str, Expert] = {}
        self._guard = _guard_of(model)  # the model's lock, shared with its other routers
        self._own_mask: ExpertMask | None = None  # the keep-everything mask it patched with
        self._watching = False  # whether its guard watches the model for it (until close())
        with self._locked():  # (now: a direct pass under way at the first request would see
            self._watch()     # its expert plugged)
        # per thread: .compute (the compute thread), .batching (a batching thread)
        self._local = threading.local()
        self._worker_lock = threading.Lock()  # guards _worker and _compute
        _free_openmp_pool()
        # Both threads start here, in the thread making the router (the main thread, usually):
        # Python 3.12 starts no thread once the main thread has ended, and a script's main
        # thread may start client threads and return. After close(), a request starts new ones.
        self._compute: _ComputeThread | None = _ComputeThread(self._local)  # every forward pass
        self._worker: _Worker | None = _Worker(self)  # the dynamic batcher

    @property
    def backend(self) -> str:
        """The kernel backend of every forward pass (doe_kernels.backends): "auto", or one
        available on the model's device."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend_name(value)
        if value != "auto":
            device = _device_of(self.model)
            present = available_backends(device.type, device.index)
            if value not in present:
                raise BackendUnavailableError(
                    f"backend {value!r} is not available for the model's {device.type} "
                    f"tensors; available: {['auto', *present]}")
        self._backend = value

    @property
    def batch_size(self) -> int:
        """Requests per forward pass (at most)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        check_batch_size(value)
        self._batch_size = value

    @property
    def batch_window(self) -> float:
        """Seconds the batching thread waits, after the first waiting request, for more (at most
        threading.TIMEOUT_MAX, the longest wait a queue takes)."""
        return self._batch_window

    @batch_window.setter
    def batch_window(self, value: float) -> None:
        if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                or not 0 <= value <= threading.TIMEOUT_MAX):
            raise ValueError(f"batch_window must be a number of seconds in [0, "
                             f"threading.TIMEOUT_MAX = {threading.TIMEOUT_MAX}], got {value!r}")
        self._batch_window = float(value)

    # ---- experts ------------------------------------------------------------------------
    def add(self, name: str, expert: Expert) -> None:
        """Register a task's expert; raises ValueError if it does not fit the model or the
        router's tokenizer (`Expert.check_fits`, `Expert.check_tokenizer`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names are non-empty strings, got {name!r}")
        if not isinstance(expert, Expert):
            raise TypeError(f"expert must be a doe_kernels.Expert, got {type(expert).__name__}")
        self._computed("add", self._add_now, name, expert)

    def _add_now(self, name: str, expert: Expert) -> None:
        with self._locked():  # the model is not being patched meanwhile
            try:
                expert.check_fits(self.model)
                expert.check_tokenizer(self.tokenizer)
            except ValueError as error:  # (the expert's own name may be another)
                raise ValueError(f"task {name!r}: {error}") from error
            self._experts[name] = expert

    def remove(self, name: str) -> None:
        """Stop serving the task `name` (KeyError for one not served). Requests already submitted
        for it are still answered, by the expert they were submitted to."""
        self._computed("remove", self._remove_now, name)

    def _remove_now(self, name: str) -> None:
        with self._locked():
            self._experts.pop(self._known(name))

    @property
    def tasks(self) -> list[str]:
        return sorted(self._experts.copy())  # dict.copy is atomic: no lock (used under it)

    def _known(self, name) -> str:
        if not isinstance(name, str) or name not in self._experts:  # a list is not hashable
            raise KeyError(f"unknown task {name!r}; known tasks: {self.tasks}")
        return name

    # ---- requests -----------------------------------------------------------------------
    def run_logits(self, name: str, batch) -> torch.Tensor:
        """(len(batch), num_labels) label logits of task `name`'s expert for a batch of texts."""
        return self._run(name, batch)[1]

    def run(self, name: str, batch) -> list[str]:
        """Predicted label names of task `name` for a batch of texts (or one text)."""
        expert, logits = self._run(name, batch)
        return [expert.label_names[i] for i in logits.argmax(-1).tolist()]

    def _run(self, name: str, batch) -> tuple[Expert, torch.Tensor]:
        """(the expert that answered, its logits): the expert is read once, under the lock, so a
        task re-added meanwhile cannot pair one expert's logits with another's labels."""
        texts = _texts(batch)
        return self._computed("run", self._run_now, name, texts)

    def _run_now(self, name: str, texts: list[str]) -> tuple[Expert, torch.Tensor]:
        with self._locked():
            expert = self._experts[self._known(name)]
            self._keep_patched()
            # (an expert without a mask runs the whole model, whatever mask the model was
            # patched with before the router: Expert.plugged)
            with expert.plugged(self.model, backend=self.backend):
                return expert, expert.predict_logits(self.model, self.tokenizer, texts,
                                                     self.batch_size, backend=self.backend)

    def _computed(self, what: str, fn, *args):
        """fn(*args) run on the router's compute thread (started with the router, and after
        close() on first use; the module's docstring says why), its result or error returned or
        raised here; asked on that thread, run at once, except from inside a forward pass (a
        hook), which holds the model's lock (whichever router's pass it is): `what` (the public
        call) is then refused."""
        if self._guard.held_here():
            raise RuntimeError(f"{what} from inside the router's forward pass (a hook on a "
                               "router's compute thread) would wait for itself")
        if self._on_compute_thread():
            return fn(*args)
        _free_openmp_pool()
        with self._worker_lock:  # close() cannot shut it down between the check and the submit
            if self._compute is None or not self._compute.thread.is_alive():  # (or forked)
                self._compute = _ComputeThread(self._local)
            future = self._compute.submit(fn, *args)
        try:
            return future.result()
        finally:  # (an error's traceback holds this frame: no cycle through its Future)
            del future

    def _locked(self):
        """The model's lock (shared by its routers), marked as held by this thread."""
        return self._guard.held()

    def _on_compute_thread(self) -> bool:
        return getattr(self._local, "compute", False)

    def _refuse_on_compute_thread(self, what: str, why: str = "would wait for itself") -> None:
        """Refuses `what` on this router's compute thread or inside a forward pass of its model
        (another router's, whose lock its own compute thread may be waiting for)."""
        if self._on_compute_thread() or self._guard.held_here():
            raise RuntimeError(f"{what} from inside the router's forward pass (a hook on a "
                               f"router's compute thread) {why}")

    def _refuse_on_batching_thread(self, what: str) -> None:
        if getattr(self._local, "batching", False):
            raise RuntimeError(f"{what} from the router's batching thread (a done callback of a "
                               "submitted request's Future) would wait for itself; submit() "
                               "there and read the result elsewhere")

    def _watch(self) -> None:
        """Have the guard make other threads' forward passes take turns with the router's
        (until close()); under the lock."""
        if not self._watching:
            self._guard.watch(unwrap_compiled(self.model))
            self._watching = True

    def _keep_patched(self) -> None:
        """Patch the model with a keep-everything mask (swaps stay cheap), and have the guard
        make other threads' forward passes on it take turns with the router's; under the lock."""
        self._watch()
        if not is_patched(self.model):
            mask = ExpertMask()
            patch(self.model, mask, self.backend)
            self._own_mask = mask

    # ---- mixed-task batches -----------------------------------------------------------------
    def run_mixed_logits(self, requests) -> list[torch.Tensor]:
        """The label logits of each `(task, text)` request, in order: one forward pass per
        `batch_size` requests whatever their tasks, each row on its task's expert. Every request
        is checked (known task, valid text) before any runs."""
        return self._mixed([(self._expert_of(task), text) for task, text in _pairs(requests)])

    def run_mixed(self, requests) -> list[str]:
        """The predicted label name of each `(task, text)` request, in order (run_mixed_logits)."""
        experts = [(self._expert_of(task), text) for task, text in _pairs(requests)]
        return [_label(expert, row) for (expert, _), row in zip(experts, self._mixed(experts))]

    def _expert_of(self, task) -> Expert:
        return self._experts[self._known(task)]

    def _mixed(self, requests: list[tuple[Expert, str]]) -> list[torch.Tensor]:
        return self._computed("run_mixed", self._mixed_now, requests) if requests else []

    def _mixed_now(self, requests: list[tuple[Expert, str]]) -> list[torch.Tensor]:
        with self._locked():
            self._keep_patched()
            return mixed_logits(self.model, self.tokenizer, requests, self.batch_size,
                                self.backend)

    # ---- dynamic batching -------------------------------------------------------------------
    def submit(self, task: str, text: str) -> Future:
        """Queue one request; returns a Future of its predicted label name. A worker thread
        serves the requests that arrive within `batch_window` seconds of the first waiting one
        (up to `batch_size`) in one mixed batch. An unknown task or an invalid text raises here,
        in the caller, and never reaches a batch; a text that the tokenizer and the expert's
        template make no token of (found where the batch is encoded: the tokenizer is used on
        the compute thread only) fails its own Future with a ValueError, before any forward
        pass, and the batch's other requests are served. What a client does with its Future
        (cancel it, a done-callback that raises) reaches no other request."""
        self._refuse_on_compute_thread("submit", "is refused: its batch would wait for this "
                                       "pass, which no answer may wait for")
        _free_openmp_pool()
        expert = self._expert_of(task)
        if not isinstance(text, str):
            raise ValueError(f"submit takes one text (a str), got {type(text).__name__}")
        (text,) = _texts(text)
        future: Future = Future()
        with self._worker_lock:  # close() cannot come between the worker check and the put
            if self._worker is None or not self._worker.thread.is_alive():
                self._worker = _Worker(self)
            # (the request holds the router: one dropped after submit() still answers it)
            self._worker.queue.put((expert, text, future, time.monotonic(), self))
        return future

    def ask(self, task: str, text: str) -> str:
        """`submit(task, text).result()`: one request through the dynamic batcher."""
        self._refuse_on_batching_thread("ask")
        return self.submit(task, text).result()

    def _serve_batch(self, batch) -> None:
        """Answer one batch of queued (expert, text, future). If a batch of several experts
        fails, each expert's requests are served again on their own, so that an error reaches
        only the futures of the expert that raised it (at most one pass per expert more: a
        text that encodes to no token fails alone, before any pass)."""
        live = [(e, t, f) for e, t, f in batch if _start(f)]
        groups: dict[int, list] = {}
        for request in live:
            groups.setdefault(id(request[0]), []).append(request)
        if len(groups) <= 1:
            self._answer(live)
        elif not self._answer(live, errors_to_futures=False):
            for group in groups.values():
                self._answer(group)

    def _answer(self, requests, errors_to_futures: bool = True) -> bool:
        """Serve (expert, text, future) requests in one mixed batch and set their futures to
        the answers (or, with `errors_to_futures`, to the error); whether it worked. A request
        whose text encodes to no token gets its own error, and the others are served without
        it."""
        requests = [request for request in requests if not request[2].done()]  # (refused alone
        # by an earlier try of this batch)
        while True:
            try:
                rows = self._mixed([(expert, text) for expert, text, _ in requests])
                labels = [_label(expert, row) for (expert, _, _), row in zip(requests, rows)]
            except NoTokenError as error:  # (raised before the batch's forward pass)
                _, _, future = requests.pop(error.index)
                _settle(future.set_exception, ValueError(error.reason))
                continue
            except BaseException as error:  # surfaced to the clients of these requests
                if errors_to_futures:
                    _fail(requests, _from_compute_thread(error))
                return False
            for (_, _, future), label in zip(requests, labels):
                _settle(future.set_result, label)
            return True

    def close(self) -> None:
        """Serve what was submitted, stop the worker and the compute thread, and restore the
        unpatched model (if the router patched it and no other patch replaced its own since). A
        request after this starts new ones.
        Call it when done: a router dropped without it leaves the model patched (its threads
        end once it is collected)."""
        self._refuse_on_compute_thread("close")
        self._refuse_on_batching_thread("close")
        while True:  # (a done callback run by the worker may submit again: a new worker)
            with self._worker_lock:
                worker, self._worker = self._worker, None
                if worker is None:
                    break
                worker.queue.put(None)  # after every request submitted before
            worker.thread.join()
            worker.finalizer.detach()
        with self._worker_lock:
            compute, self._compute = self._compute, None
        if compute is not None:
            compute.shutdown()  # after the forward passes asked for before
        with self._locked():
            if self._own_mask is not None and current_mask(self.model) is self._own_mask:
                unpatch(self.model)  # not a patch the user made meanwhile
            self._own_mask = None
            if self._watching:
                self._guard.unwatch()
                self._watching = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ModelGuard:
    """A model's lock, one for every router serving it, and a mark that a thread holds it: a
    request from a hook inside the forward pass it guards is refused instead of waiting forever.
    While routers serve the model (`watch`), a forward pass that another thread runs on it takes
    the lock too: it waits for the router's pass in progress, and the next waits for it, so that
    it never sees an expert plugged for a request, nor a router's pass its state."""

    def __init__(self):
        self.lock, self._local = threading.Lock(), threading.local()
        self._watchers, self._hooks = 0, ()  # (routers watching the model; their hooks)
        self._model = None  # (a weak reference to the model watched)

    def watch(self, model) -> None:
        """A router starts serving `model` (the module itself, not a torch.compile wrapper):
        the first one hooks its forward; under the lock."""
        self._watchers += 1
        if self._watchers == 1:
            self._model = weakref.ref(model)
            self._hooks = (model.register_forward_pre_hook(self._enter),
                           model.register_forward_hook(self._leave, always_call=True))

    def unwatch(self) -> None:
        """A router stops serving the model: the last one removes the hooks; under the lock."""
        self._watchers -= 1
        if self._watchers == 0:
            for hook in self._hooks:
                hook.remove()
            self._hooks = ()

    def _enter(self, module, args) -> None:
        """Another thread's forward pass takes the lock (a router's holds it already; a pass
        inside this thread's own pass counts one level deeper)."""
        if self._direct_depth(module, inside=2):
            self._local.depth += 1
            return
        if getattr(self._local, "held", False):  # a router's pass (a hook in it)
            return
        self.lock.acquire()
        if not self._watchers:  # the hooks were removed meanwhile (close): no _leave comes
            self.lock.release()
            return
        self._local.held, self._local.depth = True, 1  # (unwatch waits for the lock: _leave
        # runs at the end of this pass)

    def _leave(self, module, args, output) -> None:
        """... and gives it back at the end of the outermost pass, or when it raises an
        Exception (always_call)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth - 1
            if depth == 1:
                self._local.held = False
                self.lock.release()

    def _direct_depth(self, module, inside: int) -> int:
        """How deep this thread is in its own forward passes on the model; a depth that no
        forward pass on the thread's stack backs (fewer than `inside` calls of the model: a
        KeyboardInterrupt skipped the hooks that end a pass) is given up, with the lock."""
        depth = getattr(self._local, "depth", 0)
        if depth and _calls_of(module) < inside:
            self._local.held, self._local.depth = False, 0
            self.lock.release()
            return 0
        return depth

    @contextlib.contextmanager
    def held(self):
        with self.lock:
            self._local.held = True
            try:
                yield
            finally:
                self._local.held = False

    def held_here(self) -> bool:
        """Whether this thread holds the lock: in a router's pass, or in its own forward pass on
        the model (one interrupted is given up here)."""
        model = self._model() if self._model is not None else None
        if model is not None:
            self._direct_depth(model, inside=1)
        return getattr(self._local, "held", False)


def _calls_of(module) -> int:
    """How many calls of `module` (torch's Module._call_impl) this thread's stack holds."""
    frame, count = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module:
            count += 1
        frame = frame.f_back
    return count


_CALL_IMPL = torch.nn.Module._call_impl.__code__


_GUARDS: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelGuard]" = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


_FORK_WAIT = 60.0  # seconds a fork waits for each pass in progress
_FORKING = threading.local()  # .taken: the locks the forking thread took


def _before_fork() -> None:
    """A process forked while a router's pass (or another thread's forward pass on a served
    model) runs would copy the model in the middle of it, its lock held by a thread the child
    lacks, whose router would wait forever: a fork waits for the passes in progress (not for one
    the forking thread is in; at most _FORK_WAIT seconds each, so that passes waiting on each
    other's models cannot hold a fork forever). Nothing is kept taken if it is interrupted."""
    taken = _FORKING.taken = []
    try:
        with _GUARDS_LOCK:
            guards = [guard for guard in _GUARDS.values() if not guard.held_here()]
        for guard in guards:
            if guard.lock.acquire(timeout=_FORK_WAIT):
                taken.append(guard.lock)
        _GUARDS_LOCK.acquire()
        taken.append(_GUARDS_LOCK)
    except BaseException:
        _after_fork()
        raise


def _after_fork() -> None:
    """In the parent and in the child: the locks the fork took given back."""
    taken = getattr(_FORKING, "taken", [])
    while taken:
        taken.pop().release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                        after_in_child=_after_fork)


def _guard_of(model) -> _ModelGuard:
    """The guard of `model` (the module a torch.compile wrapper compiles), made on its first
    router; it goes with the model."""
    model = unwrap_compiled(model)
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = _ModelGuard()
        return guard


def _start(future: Future) -> bool:
    """Whether a queued request is to be served: its Future not cancelled (nor put in another
    state by its client)."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # the client set it running or done itself
        return False


def _settle(set_outcome, value) -> None:
    """`future.set_result(value)` / `set_exception(value)`, whatever its client did to it (set it
    itself) or its done-callbacks raise (concurrent.futures lets a BaseException through): the
    batch's other requests are still answered."""
    try:
        set_outcome(value)
    except BaseException:  # noqa: BLE001 (one client's Future; the others still need answers)
        pass


class _ComputeThread:
    """The router's compute thread and its queue of (fn, args, Future), ended by None. A plain
    daemon thread, not a ThreadPoolExecutor: Python shuts those down as soon as the main thread
    ends, before it waits for the other threads, whose requests would then fail."""

    def __init__(self, local: threading.local):
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=_compute, args=(self.queue, local), daemon=True,
                                       name="doe-kernels-compute")
        self.thread.start()
        weakref.finalize(self, self.queue.put, None)  # a router dropped unclosed: it ends

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self.queue.put((fn, args, future))
        return future

    def shutdown(self) -> None:
        """Stop after the calls submitted before, and wait for it."""
        self.queue.put(None)
        self.thread.join()


def _compute(calls: queue.Queue, local: threading.local) -> None:
    """The compute thread: runs each queued (fn, args, Future) until None (holding neither the
    router nor its _ComputeThread, so that one dropped unclosed is collected)."""
    _mark(local)
    while (item := calls.get()) is not None:
        fn, args, future = item
        del item
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 (raised in the caller's thread)
            future.set_exception(error)
        del fn, args, future  # (nor the last call's router while it waits)


class _Worker:
    """The dynamic batcher's thread and its own queue of (expert, text, future, time queued),
    ended by None: a router's close() stops this worker after the requests queued before it, and
    a later submit() starts another with a new queue. The thread holds its router only while it
    serves a batch, and each queued request holds it: a router dropped unclosed is collected
    once its requests are answered, and its worker ends."""

    def __init__(self, router: ExpertRouter):
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=_batching, args=(weakref.ref(router), self),
                                       daemon=True, name="doe-kernels-router")
        self.thread.start()
        self.finalizer = weakref.finalize(router, self.queue.put, None)

    def serve(self, router_ref) -> bool:
        """Take and serve the next batch; whether the queue has ended (or the router is gone)."""
        batch, requests = [], []
        try:  # (taking the batch may fail too: its requests taken so far get the error)
            closed = self._next_batch(batch)
            router = batch[0][4] if batch else router_ref()  # (a request holds its router)
            requests = [item[:3] for item in batch]
            del batch[:]
            if router is None:
                return True
            if requests:
                router._serve_batch(requests)
            return closed
        except BaseException as error:  # noqa: BLE001 (the thread serves every later batch)
            _fail(requests or [item[:3] for item in batch], error)
            traceback.clear_frames(error.__traceback__)  # (the finished frames' locals: the
            requests = router = batch = None  # futures, which hold the error, and the router)
            return False

    def _next_batch(self, batch: list) -> bool:
        """Takes the requests of the next batch into `batch` (the queue's items, each holding
        its router); whether the queue has ended."""
        first = self.queue.get()
        if first is None:
            return True
        batch.append(first)
        router = first[4]
        window, size = router.batch_window, router.batch_size
        del router
        # the window runs from the first request's arrival, not from when this thread is free
        deadline = first[3] + window
        while len(batch) < size:
            try:
                item = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                return True
            batch.append(item)
        return False


def _batching(router_ref, worker: _Worker) -> None:
    """A batching thread: serves `worker`'s batches until its queue ends, or until its router is
    collected (dropped unclosed, every request answered); holds the router only while it serves a
    batch."""
    router = router_ref()
    if router is None:
        return
    router._local.batching = True  # marks this thread (close() may drop the worker)
    del router
    while not worker.serve(router_ref):
        pass


def _from_compute_thread(error: BaseException) -> BaseException:
    """`error`, raised on the compute thread and again in the batching thread (`_computed`),
    with the compute thread's part of its traceback only: the part that says where it failed.
    The batching thread's frames would hold the batch's futures, which hold the error: a cycle
    that kept a router dropped unclosed until the garbage collector found it."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code is not _compute.__code__:
        tb = tb.tb_next
    return error if tb is None else error.with_traceback(tb)


def _fail(batch: list, error: BaseException) -> None:
    """Each (expert, text, future) of `batch` not yet answered gets `error`."""
    for _, _, future in batch:
        if not future.done():
            _settle(future.set_exception, error)


def _free_openmp_pool() -> bool:
    """Called on the main thread: frees its idle OpenMP worker pool, if PyTorch runs GNU OpenMP
    (its Linux wheels) and the main thread is not in a parallel region; whether it did. The pool
    comes back the next time the main thread runs a parallel op. Elsewhere, and with another
    OpenMP runtime (Intel's pauses the whole process's), nothing happens."""
    if threading.current_thread() is not threading.main_thread():
        return False
    pause = _gnu_openmp_pause()
    return pause is not None and pause(2) == 0  # omp_pause_hard: libgomp frees this pool


@functools.lru_cache(maxsize=1)
def _gnu_openmp_pause():
    """omp_pause_resource_all of the GNU OpenMP library this process loaded, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    paths = {path for path in paths if path.startswith("/")}
    torch_lib = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda path: (torch_lib not in path, path)):  # torch's first
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return None


def _device_of(model) -> torch.device:
    """The device of the model's input embeddings (where its forward passes start), or of its
    first parameter; the CPU for a model without parameters."""
    model = unwrap_compiled(model)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _mark(local: threading.local) -> None:
    """Marks the compute thread (without a reference to the router)."""
    local.compute = True


def _label(expert: Expert, logits: torch.Tensor) -> str:
    return expert.label_names[int(logits.argmax())]


def _pairs(requests) -> list[tuple]:
    """`requests` as a list of (task, text) pairs; a text is checked as `_texts` checks it."""
    if isinstance(requests, (str, bytes)) or not hasattr(requests, "__iter__"):
        raise ValueError(f"requests must be a list of (task, text) pairs, got "
                         f"{type(requests).__name__}")
    pairs = []
    for i, request in enumerate(requests):
        if not isinstance(request, (tuple, list)) or len(request) != 2:
            raise ValueError(f"request {i} must be a (task, text) pair, got {request!r:.80}")
        try:
            (text,) = _texts([request[1]])
        except ValueError as error:
            raise ValueError(f"request {i}: {error}") from None
        pairs.append((request[0], text))
    return pairs


def _texts(batch) -> list[str]:
    """A batch as a non-empty list of texts that are valid Unicode (no lone surrogates)."""
    if isinstance(batch, str):
        batch = [batch]
    elif not isinstance(batch, (list, tuple)) or not batch:  # `not` only on a list or tuple
        raise ValueError(f"a batch is a text or a non-empty list of texts, got {type(batch).__name__}"
                         + (" (empty)" if isinstance(batch, (list, tuple)) else ""))
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise ValueError(f"batch item {i} is a {type(text).__name__}, not a text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"batch item {i} is not valid Unicode text: {error.reason} "
                             f"({text[error.start]!r} at position {error.start})") from None
    return list(batch)
