"""ExpertRouter: answers equal each expert alone, under concurrent threads; errors change nothing."""
import os
import random
import signal
import threading
import time

import pytest
import torch

import doe_kernels as dk
from expert_utils import TEXTS, seq_cls_expert, tiny_bert
from model_utils import snapshot, state_dict_equal

pytestmark = pytest.mark.usefixtures("one_thread")


def run_clients(client, count: int) -> list[str]:
    """`client(i)` (a generator of error messages) in `count` threads at once, each given five
    minutes; every message they yield, and any exception they raise."""
    errors = []

    def run(i):
        try:
            errors.extend(client(i))
        except Exception as error:  # surfaced by the caller
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    errors += [f"{thread.name} still running after five minutes" for thread in threads
               if thread.is_alive()]
    return errors


@pytest.fixture
def served(tokenizer):
    """A tiny BERT, three experts and each one's logits on TEXTS alone. Each expert's head bias
    is set so that it answers both labels over TEXTS (a random head on a random model answers
    one label for every text, and an answer handed to another request of its expert would go
    unseen)."""
    model = tiny_bert()
    experts = {}
    for i, rate in enumerate((0.3, 0.6, 0.9)):
        expert = seq_cls_expert(model, rate=rate, seed=i)
        margin = expert.predict_logits(model, tokenizer, TEXTS).diff(dim=1)[:, 0]
        expert.head["classifier.bias"][1] -= margin.median() + 1e-3 * margin.std()
        experts[f"task{i}"] = expert
    alone = {name: e.predict_logits(model, tokenizer, TEXTS) for name, e in experts.items()}
    for logits in alone.values():
        assert len(set(logits.argmax(dim=1).tolist())) == 2
    return model, experts, alone


def test_router_answers_equal_each_expert_alone(served, tokenizer):
    model, experts, alone = served
    before = snapshot(model)
    with dk.ExpertRouter(model, tokenizer) as router:
        for name, expert in experts.items():
            router.add(name, expert)
        assert router.tasks == sorted(experts)
        for name in ["task2", "task0", "task1", "task0"]:
            torch.testing.assert_close(router.run_logits(name, TEXTS), alone[name])
            assert router.run(name, TEXTS[0]) == [
                experts[name].label_names[int(alone[name][0].argmax())]]
        assert dk.is_patched(model) and dk.current_mask(model).ffn == {}  # keep-everything
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_router_serialises_concurrent_requests(served, tokenizer):
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer)
    for name, expert in experts.items():
        router.add(name, expert)
    order = list(experts) * 4

    def client(offset):
        for step in range(len(order)):
            name = order[(offset + step) % len(order)]
            got = router.run_logits(name, TEXTS)
            if not torch.allclose(got, alone[name], atol=1e-5, rtol=1e-5):
                yield f"{name}: answer differs from the expert alone"

    errors = run_clients(client, 4)
    router.close()
    assert not errors, errors[:3]


def assert_refused_from_a_hook(model, call, request) -> None:
    """`call()` from a hook inside the forward pass that `request()` runs raises instead of
    waiting for itself."""
    hook = model.register_forward_pre_hook(lambda module, args: call())
    try:
        with pytest.raises(RuntimeError, match="forward pass .* wait for itself"):
            request()
    finally:
        hook.remove()


def test_routers_on_one_model_take_turns(served, tokenizer):
    """Two routers on one model, each on its own compute thread, share the model's lock: a slow
    forward pass of one is never swapped to the other's expert midway, every answer equals its
    expert alone, and a request to (or close of) one from inside the other's forward pass is
    refused."""
    model, experts, alone = served
    slow = model.bert.encoder.layer[0].register_forward_pre_hook(lambda m, a: time.sleep(0.02))
    first, second = dk.ExpertRouter(model, tokenizer), dk.ExpertRouter(model, tokenizer)
    first.add("task0", experts["task0"])
    second.add("task1", experts["task1"])
    second.add("task2", experts["task2"])

    def client(i):
        router, names = (first, ["task0"]) if i % 2 == 0 else (second, ["task1", "task2"])
        for step in range(6):
            name = names[step % len(names)]
            got = router.run_logits(name, TEXTS) if step % 3 else \
                torch.stack(router.run_mixed_logits([(name, text) for text in TEXTS]))
            if not torch.allclose(got, alone[name], atol=1e-5, rtol=1e-5):
                yield f"{name}: answer differs from the expert alone"

    try:
        assert not run_clients(client, 4)
        for call in (lambda: second.run("task1", TEXTS[0]), second.close):
            assert_refused_from_a_hook(model, call, lambda: first.run("task0", TEXTS[0]))
        first.close()  # the model stays patched for the other router's next request
        torch.testing.assert_close(second.run_logits("task2", TEXTS), alone["task2"])
    finally:
        slow.remove()
        first.close()
        second.close()
    assert not dk.is_patched(model)


def test_router_errors_leave_the_model_as_it_was(served, tokenizer):
    """A refused request (unknown task, bad batch) or a refused expert leaves the model's mask,
    its weights and buffers (bitwise) and the router's tasks as they were."""
    model, experts, _ = served
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", experts["task0"])
    router.run("task0", TEXTS)
    mask_before, before = dk.current_mask(model), snapshot(model)
    with pytest.raises(KeyError, match="unknown task 'nope'; known tasks: \\['task0'\\]"):
        router.run("nope", TEXTS)
    for bad in ([], [1, 2], None):
        with pytest.raises(ValueError, match="batch"):
            router.run("task0", bad)
    assert dk.current_mask(model) is mask_before
    assert state_dict_equal(snapshot(model), before)
    other = seq_cls_expert(tiny_bert(num_labels=3), seed=5)
    with pytest.raises(ValueError, match="labels"):
        router.add("task9", other)
    with pytest.raises(TypeError, match="must be a doe_kernels.Expert"):
        router.add("task9", "expert")
    assert router.tasks == ["task0"]
    assert dk.current_mask(model) is mask_before
    assert state_dict_equal(snapshot(model), before)
    router.close()
    assert not dk.is_patched(model)


class _AddOnRelease:
    """A model's router lock that, once armed, runs an action right after it is next released:
    another thread's `router.add` landing between the forward pass and the reading of the
    labels."""

    def __init__(self):
        self.lock, self.action = threading.Lock(), None

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        action, self.action = self.action, None
        if action is not None:
            action()


def test_labels_come_from_the_expert_that_computed_the_logits(served, tokenizer, monkeypatch):
    model, experts, alone = served
    first = experts["task0"]
    other = seq_cls_expert(model, seed=7)
    other.label_names = ["OTHER-0", "OTHER-1"]
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", first)
    router._guard.lock = _AddOnRelease()
    forward = first.predict_logits

    def forward_then_readd(*args, **kwargs):
        router._guard.lock.action = lambda: router.add("task0", other)
        return forward(*args, **kwargs)

    monkeypatch.setattr(first, "predict_logits", forward_then_readd)
    labels = router.run("task0", TEXTS)
    assert labels == [first.label_names[i] for i in alone["task0"].argmax(-1).tolist()]
    assert router._experts["task0"] is other  # the re-add did land, after the forward pass
    router.close()


@pytest.mark.parametrize("text", ["\ud800", ["fine", "bad \udfff end"]])
def test_texts_with_lone_surrogates_are_refused(served, tokenizer, text):
    model, experts, _ = served
    with dk.ExpertRouter(model, tokenizer) as router:
        router.add("task0", experts["task0"])
        with pytest.raises(ValueError, match="is not valid Unicode text"):
            router.run("task0", text)
        with pytest.raises(KeyError, match=r"unknown task \['task0'\]"):
            router.run(["task0"], TEXTS)


# ---- mixed-task batches ---------------------------------------------------------------------
def mixed_requests(tasks, count=24, seed=0):
    rng = random.Random(seed)
    return [(rng.choice(tasks), rng.choice(TEXTS)) for _ in range(count)]


def test_run_mixed_answers_equal_each_expert_alone(served, tokenizer):
    model, experts, alone = served
    requests = mixed_requests(sorted(experts))
    with dk.ExpertRouter(model, tokenizer, batch_size=7) as router:
        for name, expert in experts.items():
            router.add(name, expert)
        logits = router.run_mixed_logits(requests)
        labels = router.run_mixed(requests)
    assert not dk.is_patched(model)
    for (task, text), row, label in zip(requests, logits, labels):
        expected = alone[task][TEXTS.index(text)]
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
        assert label == experts[task].label_names[int(expected.argmax())]


def test_dynamic_batching_under_8_threads_equals_single_threaded(served, tokenizer):
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_size=6, batch_window=0.02)
    for name, expert in experts.items():
        router.add(name, expert)
    expected = {(task, text): experts[task].label_names[int(alone[task][i].argmax())]
                for task in experts for i, text in enumerate(TEXTS)}
    batches, mixed = [], router._mixed
    router._mixed = lambda requests: batches.append(len(requests)) or mixed(requests)
    def client(seed):
        for task, text in mixed_requests(sorted(experts), count=6, seed=seed):
            if router.ask(task, text) != expected[task, text]:
                yield f"{task}: {text!r} answered differently"

    errors = run_clients(client, 8)
    router.close()
    assert not errors, errors[:3]
    assert sum(batches) == 48 and max(batches) <= 6
    assert len(batches) < 48  # requests from several threads were served together
    assert not dk.is_patched(model)


def test_every_forward_pass_runs_on_the_routers_compute_thread(served, tokenizer):
    """Whichever thread asks (run, run_mixed, ask, from the main thread or clients), the model
    runs on the router's one compute thread; a request made on that thread runs there at once;
    close() ends it, and a later request starts another."""
    model, experts, alone = served
    ran_on = []
    hook = model.register_forward_pre_hook(lambda m, a: ran_on.append(threading.current_thread()))
    router = dk.ExpertRouter(model, tokenizer, batch_size=4, batch_window=0.001)
    for name, expert in experts.items():
        router.add(name, expert)

    def client(seed):
        for task, text in mixed_requests(sorted(experts), count=3, seed=seed):
            router.run(task, text)
            router.ask(task, text)
        router.run_mixed(mixed_requests(sorted(experts), count=3, seed=seed))
        yield from ()

    try:
        router.run("task0", TEXTS[0])
        assert not run_clients(client, 4)
        nested = router._computed("nested", router.run_logits, "task1", TEXTS[:2])
        torch.testing.assert_close(nested, alone["task1"][:2])
        for call, said in ((lambda: router.submit("task0", TEXTS[0]),
                            "submit from inside .* its batch would wait for this pass"),
                           (router.close, "close from inside .* would wait for itself")):
            with pytest.raises(RuntimeError, match=said):
                router._computed("test", call)
        compute = ran_on[0]
        assert compute.name.startswith("doe-kernels-compute")
        assert all(thread is compute for thread in ran_on) and len(ran_on) > 20
        router.close()
        assert not compute.is_alive()
        router.run("task0", TEXTS[0])
        assert ran_on[-1] is not compute and ran_on[-1].name.startswith("doe-kernels-compute")
    finally:
        router.close()
        hook.remove()
    assert not dk.is_patched(model)


def test_a_router_left_open_is_freed(served, tokenizer):
    """The compute and batching threads keep no reference to their router: one dropped without
    close(), after run and submit requests, goes (and its threads end)."""
    import gc
    import weakref

    model, experts, alone = served
    before = set(threading.enumerate())
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", experts["task0"])  # on the compute thread too
    router.run("task0", TEXTS[0])
    expert = experts["task0"]
    assert router.ask("task0", TEXTS[1]) == expert.label_names[int(alone["task0"][1].argmax())]
    started = [t for t in set(threading.enumerate()) - before
               if t.name.startswith(("doe-kernels-compute", "doe-kernels-router"))]
    assert len(started) == 2
    gone = weakref.ref(router)
    del router
    gc.collect()
    assert gone() is None
    for thread in started:
        thread.join(timeout=30)
        assert not thread.is_alive()
    dk.unpatch(model)


def test_requests_outlive_a_router_dropped_after_submit(served, tokenizer):
    """A router dropped unclosed right after submit() still answers what was submitted (each
    queued request holds it), and goes after."""
    import gc
    import weakref

    model, experts, alone = served
    expert = experts["task0"]

    def submitted():
        router = dk.ExpertRouter(model, tokenizer)
        router.add("task0", expert)
        return [router.submit("task0", text) for text in TEXTS[:3]], weakref.ref(router)

    futures, gone = submitted()
    labels = [expert.label_names[int(row.argmax())] for row in alone["task0"][:3]]
    assert [future.result(timeout=120) for future in futures] == labels
    gc.collect()
    assert gone() is None
    dk.unpatch(model)


def test_a_router_dropped_after_a_failed_batch_goes_at_once(served, tokenizer, monkeypatch):
    """A batch failing in its forward pass left a reference cycle (the error's traceback held
    the batching thread's frames, which held the batch's futures, which hold the error): a
    router dropped unclosed afterwards lived until the garbage collector ran. The error still
    says where it failed."""
    import gc
    import traceback
    import weakref

    from doe_kernels import serve

    def forward_fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    model, experts, _ = served
    monkeypatch.setattr(serve, "mixed_logits", forward_fails)
    gc.collect()
    gc.disable()
    try:
        router = dk.ExpertRouter(model, tokenizer, batch_window=0.001)
        router.add("task0", experts["task0"])
        error = router.submit("task0", TEXTS[0]).exception(timeout=120)
        assert "forward_fails" in "".join(traceback.format_exception(error))
        gone = weakref.ref(router)
        del router, error
        deadline = time.monotonic() + 30
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone() is None
    finally:
        gc.enable()
    dk.unpatch(model)


def test_a_router_whose_compute_thread_ended_starts_another(served, tokenizer):
    """A compute thread that is gone (in a child process forked from the router's, say) is
    replaced on the next request instead of waiting for it forever."""
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer)
    router._compute.shutdown()  # (as a fork leaves it: the object, no thread)
    done = []
    caller = threading.Thread(target=lambda: done.append(router.add("task0", experts["task0"])),
                              daemon=True)
    caller.start()
    caller.join(timeout=120)
    try:
        assert done == [None], "add waited for a compute thread that had ended"
    finally:
        router.close()


def test_the_main_threads_openmp_pool_is_freed(served, tokenizer, monkeypatch):
    """On the main thread `_free_openmp_pool` ends its OpenMP workers (GNU OpenMP: they leave
    the process's task list) and torch computes as before; on another thread it does nothing.
    The router calls it when built and for each request (it acts on the main thread only)."""
    import os

    from doe_kernels import serve

    if serve._gnu_openmp_pause() is None:
        pytest.skip("PyTorch does not run GNU OpenMP here")
    x = torch.randn(2000, 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = torch.nn.functional.layer_norm(x, (1000,))  # a parallel op: a pool of 2
        tasks = len(os.listdir("/proc/self/task"))
        assert serve._free_openmp_pool()
        assert len(os.listdir("/proc/self/task")) < tasks
        assert torch.equal(torch.nn.functional.layer_norm(x, (1000,)), expected)
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(serve._free_openmp_pool()))
        thread.start()
        thread.join()
        assert elsewhere == [False]
    finally:
        torch.set_num_threads(threads)
    model, experts, alone = served
    calls = []
    monkeypatch.setattr(serve, "_free_openmp_pool", lambda: calls.append(
        threading.current_thread() is threading.main_thread()))
    with dk.ExpertRouter(model, tokenizer) as router:
        router.add("task0", experts["task0"])
        assert calls == [True, True]
        router.run("task0", TEXTS[0])
        assert calls == [True, True, True]
        assert not run_clients(lambda i: router.run("task0", TEXTS[0]) and (), 2)
        assert calls == [True, True, True, False, False]
        router.ask("task0", TEXTS[0])  # from the main thread, through the batching thread
        assert calls[5] is True


def test_bad_mixed_requests_are_refused_and_others_are_served(served, tokenizer):
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", experts["task0"])
    for requests, error, match in [([("task0", "fine"), ("nope", "fine")], KeyError, "nope"),
                                   ([("task0", "fine"), ("task0",)], ValueError, "request 1"),
                                   ([("task0", "\ud800")], ValueError, "request 0"),
                                   ("task0", ValueError, "pairs")]:
        with pytest.raises(error, match=match):
            router.run_mixed(requests)
    assert not dk.is_patched(model)  # nothing ran
    pending = router.submit("task0", TEXTS[0])
    with pytest.raises(KeyError, match="nope"):
        router.submit("nope", TEXTS[0])
    with pytest.raises(ValueError, match="one text"):
        router.submit("task0", TEXTS)
    expected = experts["task0"].label_names[int(alone["task0"][0].argmax())]
    assert pending.result(timeout=60) == expected
    router.close()
    assert not dk.is_patched(model)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            dk.ExpertRouter(model, tokenizer, batch_size=bad)
    with pytest.raises(ValueError, match="batch_window"):
        dk.ExpertRouter(model, tokenizer, batch_window=-1)
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", experts["task0"])
    for name, bad in (("batch_window", None), ("batch_window", float("nan")),
                      ("batch_size", 0)):  # set later, refused as at construction
        with pytest.raises(ValueError, match=name):
            setattr(router, name, bad)
    assert (router.batch_size, router.batch_window) == (32, 0.005)
    assert router.ask("task0", TEXTS[0]) == expected
    router.close()
    assert not dk.is_patched(model)
    assert dk.ExpertRouter(model, tokenizer).run_mixed([]) == []
    assert not dk.is_patched(model)  # nothing to run: the model was not patched


def test_a_router_on_a_torch_compile_wrapper(served, tokenizer):
    """A router takes a torch.compile wrapper as it takes its model (the two share the model's
    lock), and answers as the experts alone do."""
    from doe_kernels import serve

    model, experts, alone = served
    compiled = torch.compile(model, backend="eager")
    assert serve._guard_of(compiled) is serve._guard_of(model)
    # torch 2.11 crashes a compile on the main thread once the process's first compile ran on
    # another thread (a PyTorch bug, README): compiled here first, as the README advises
    with torch.no_grad():
        compiled(**tokenizer(TEXTS[:1], return_tensors="pt"))
    with dk.ExpertRouter(compiled, tokenizer) as router:
        router.add("task1", experts["task1"])
        torch.testing.assert_close(router.run_logits("task1", TEXTS), alone["task1"])
        assert router.run_mixed([("task1", TEXTS[1])]) == router.run("task1", TEXTS[1])
    assert not dk.is_patched(model)


def test_submit_racing_close_loses_no_request(served, tokenizer):
    """Requests submitted while another thread closes the router are all answered: each close
    stops its worker after the requests queued before it, a later submit starts a new one."""
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_size=4, batch_window=0.001)
    router.add("task0", experts["task0"])
    expected = experts["task0"].label_names[int(alone["task0"][0].argmax())]
    futures, stop = [], threading.Event()

    def closer():
        while not stop.is_set():
            router.close()

    thread = threading.Thread(target=closer)
    thread.start()
    try:
        for _ in range(40):
            futures.append(router.submit("task0", TEXTS[0]))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert [f.result(timeout=60) for f in futures] == [expected] * 40
    router.close()
    assert not dk.is_patched(model)


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(served, tokenizer):
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_window=0.001)
    router.add("task0", experts["task0"])
    mixed, failures = router._mixed, [RuntimeError("out of memory")]

    def fail_once(requests):
        if failures:
            raise failures.pop()
        return mixed(requests)

    router._mixed = fail_once
    with pytest.raises(RuntimeError, match="out of memory"):
        router.ask("task0", TEXTS[0])
    assert router.ask("task0", TEXTS[0]) == experts["task0"].label_names[
        int(alone["task0"][0].argmax())]
    router.close()


@pytest.mark.parametrize("misuse", ["callback-exits", "client-sets-running", "client-sets-result"])
def test_what_a_client_does_with_its_future_reaches_no_other_request(served, tokenizer, misuse):
    """A done-callback raising SystemExit (concurrent.futures lets it through), or a client that
    puts its Future in another state itself, killed the batching thread: the rest of its batch
    and every later request waited forever."""
    import sys

    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_size=3, batch_window=30)
    router.add("task0", experts["task0"])
    want = experts["task0"].label_names[int(alone["task0"][0].argmax())]
    hold = threading.Event()
    mixed = router._mixed
    router._mixed = lambda requests: hold.wait(60) and mixed(requests)  # one batch of three
    first = router.submit("task0", TEXTS[0])
    if misuse == "callback-exits":
        first.add_done_callback(lambda future: sys.exit(0))
    elif misuse == "client-sets-running":
        first.set_running_or_notify_cancel()
    else:
        first.set_result("mine")
    others = [router.submit("task0", TEXTS[0]) for _ in range(2)]
    hold.set()
    assert [future.result(timeout=60) for future in others] == [want, want]
    router.batch_window = 0.001
    assert router.ask("task0", TEXTS[0]) == want  # the thread serves later requests too
    router.close()


def test_one_experts_failure_fails_only_its_requests(served, tokenizer):
    """A mixed batch that fails is served again expert by expert: the other experts' requests
    get their answers, the failing expert's requests its error."""
    model, experts, alone = served
    # the batch closes at its 4th request (batch_size); the window only bounds a stalled run
    router = dk.ExpertRouter(model, tokenizer, batch_size=4, batch_window=30)
    for name in ("task0", "task1"):
        router.add(name, experts[name])
    mixed, batches = router._mixed, []

    def fail_with_task1(requests):
        batches.append(len(requests))
        if any(expert is experts["task1"] for expert, _ in requests):
            raise ValueError("task1 cannot be served")
        return mixed(requests)

    router._mixed = fail_with_task1
    try:
        futures = [router.submit(task, TEXTS[i]) for i, task in
                   enumerate(["task0", "task1", "task0", "task1"])]
        assert futures[0].result(timeout=60) == experts["task0"].label_names[
            int(alone["task0"][0].argmax())]
        assert futures[2].result(timeout=60) == experts["task0"].label_names[
            int(alone["task0"][2].argmax())]
        for future in futures[1::2]:
            with pytest.raises(ValueError, match="task1 cannot be served"):
                future.result(timeout=60)
    finally:
        router.close()
    assert batches == [4, 2, 2]  # the whole batch, then each expert's requests
    assert not dk.is_patched(model)


def test_add_refuses_an_expert_the_tokenizer_cannot_serve(tokenizer):
    """Label words this tokenizer encodes to other ids, or a template longer than max_length
    on its own: refused by add(), not by every later batch holding the expert."""
    from doe_kernels.expert import Expert, label_token_ids, model_sizes
    from expert_utils import tiny_llama

    model = tiny_llama()
    ids = label_token_ids(tokenizer, [" positive", " negative"])

    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))

    def expert(**kwargs):
        args = dict(label_words=[" positive", " negative"], label_token_ids=ids,
                    sizes=model_sizes(model)) | kwargs
        return Expert(None, prompt, "causal_lm", ["positive", "negative"], **args)

    with dk.ExpertRouter(model, tokenizer) as router:
        with pytest.raises(ValueError, match="encodes the label words"):
            router.add("swapped", expert(label_token_ids=ids[::-1]))
        with pytest.raises(ValueError, match="alone is longer than max_length=4"):
            router.add("long", expert(template="a rather long template: {text}", max_length=4))
        assert router.tasks == []
        router.add("ids only", expert(label_words=None))  # token ids without words: served
        router.add("words", expert())
        ids_only, words = router.run_mixed_logits([("ids only", TEXTS[0]), ("words", TEXTS[0])])
        torch.testing.assert_close(ids_only, words)  # the same expert but for its words
        torch.testing.assert_close(words, router.run_logits("words", [TEXTS[0]])[0])
    assert not dk.is_patched(model)


def test_decoder_sequence_classifiers_are_refused(tokenizer):
    """A LLaMA-family ...ForSequenceClassification reads its answer at the last position, which
    padding and the soft prompt move: refused with a message naming the way that works."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from doe_kernels.expert import detect_task_type

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, vocab_size=30522,
                         pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="BERT-family models only.*ForCausalLM"):
        detect_task_type(model)
    head = {"score.weight": torch.randn(2, 32)}
    expert = dk.Expert(None, torch.randn(3, 32), "seq_cls", ["negative", "positive"], head=head)
    with dk.ExpertRouter(model, tokenizer) as router:
        with pytest.raises(ValueError, match="BERT-family models only"):
            router.add("sentiment", expert)
        assert router.tasks == []


def test_an_expert_without_a_mask_runs_the_whole_model(served, tokenizer):
    """On a model patched before the router, an expert without a mask (`Expert.dense()`) runs
    the unpruned model through run() as through run_mixed(); close() leaves the user's patch."""
    model, experts, _ = served
    dense = experts["task1"].dense()
    expected = dense.predict_logits(model, tokenizer, TEXTS[:3])
    user_mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, seed=3)
    dk.patch(model, user_mask)
    try:
        with dk.ExpertRouter(model, tokenizer) as router:
            router.add("dense", dense)
            torch.testing.assert_close(router.run_logits("dense", TEXTS[:3]), expected)
            mixed = router.run_mixed_logits([("dense", text) for text in TEXTS[:3]])
            torch.testing.assert_close(torch.stack(mixed), expected, atol=1e-5, rtol=1e-5)
        assert dk.current_mask(model) is user_mask
    finally:
        dk.unpatch(model)
    router = dk.ExpertRouter(model, tokenizer)
    router.add("task0", experts["task0"])
    router.run("task0", TEXTS[0])  # the router patches the model
    dk.patch(model, user_mask)  # and the user swaps in an expert of their own
    router.close()
    assert dk.current_mask(model) is user_mask  # left as the user made it
    dk.unpatch(model)


def test_calls_that_would_wait_for_themselves_are_refused(served, tokenizer):
    """ask() or close() from a done callback (the batching thread), and run(), run_mixed(),
    add() or remove() from a hook inside the router's forward pass, raise instead of hanging the
    router."""
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_window=0.001)
    router.add("task0", experts["task0"])
    expected = experts["task0"].label_names[int(alone["task0"][0].argmax())]
    errors, done = [], threading.Event()

    def callback(_):
        for call in (lambda: router.ask("task0", TEXTS[0]), router.close):
            try:
                call()
            except RuntimeError as error:
                errors.append(str(error))
        done.set()

    try:
        with router._guard.lock:  # the request cannot be answered before its callback is added
            router.submit("task0", TEXTS[0]).add_done_callback(callback)
        assert done.wait(60)
        assert len(errors) == 2 and all("batching thread" in e for e in errors), errors
        assert router.ask("task0", TEXTS[0]) == expected  # the router goes on
        for call in (lambda: router.run_logits("task0", TEXTS[0]),
                     lambda: router.run_mixed([("task0", TEXTS[0])]),
                     lambda: router.add("again", experts["task1"]),
                     lambda: router.remove("task0")):
            assert_refused_from_a_hook(model, call, lambda: router.run("task0", TEXTS[0]))
        assert router.run("task0", TEXTS[0]) == [expected]
        assert router.tasks == ["task0"]
    finally:
        router.close()
    assert not dk.is_patched(model)


def test_a_batch_of_another_type_is_refused_by_name():
    from doe_kernels.serve import _texts

    numpy = pytest.importorskip("numpy")
    for batch, match in [(numpy.array(["a", "b"]), "got ndarray$"), ([], r"got list \(empty\)"),
                         (None, "got NoneType$")]:
        with pytest.raises(ValueError, match=match):
            _texts(batch)


def test_a_submit_from_a_callback_while_closing_leaves_nothing_running(served, tokenizer):
    """close() while a done callback (run by the batching thread) submits again: close waits for
    the worker that submit starts too, and returns with no router thread left and the model
    unpatched."""
    model, experts, _ = served
    router = dk.ExpertRouter(model, tokenizer, batch_window=0.001)
    router.add("task0", experts["task0"])
    release, later = threading.Event(), []

    def callback(future):
        release.wait(timeout=60)
        later.append(router.submit("task0", TEXTS[1]))

    router.submit("task0", TEXTS[0]).add_done_callback(callback)
    closing = threading.Thread(target=router.close)
    closing.start()
    time.sleep(0.2)  # close() is joining the worker, whose callback waits
    release.set()
    closing.join(timeout=60)
    assert not closing.is_alive() and later and later[0].done()
    assert not dk.is_patched(model)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("doe-kernels")]


def test_a_router_serves_other_threads_after_the_main_thread_ends(tmp_path):
    """A script whose main thread starts client threads and returns: the router still answers
    them (a ThreadPoolExecutor is shut down when the main thread ends, and every later request
    failed)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "clients.py"
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "python")]
    script.write_text(
        "import sys, threading, time\n"
        f"sys.path[:0] = {paths!r}\n"
        "import doe_kernels as dk\n"
        "from transformers import AutoTokenizer\n"
        "from expert_utils import TEXTS, seq_cls_expert, tiny_bert\n"
        "from real_models import minilm_dir\n"
        "model, tokenizer = tiny_bert(), AutoTokenizer.from_pretrained(minilm_dir())\n"
        "router = dk.ExpertRouter(model, tokenizer, batch_window=0.001)\n"
        "router.add('t', seq_cls_expert(model, rate=0.5))\n"
        "def client():\n"
        "    time.sleep(0.5)  # the main thread has returned\n"
        "    for text in TEXTS[:3]:\n"
        "        router.ask('t', text), router.run('t', text)\n"
        "    router.close()\n"
        "    print('served', flush=True)\n"
        "threading.Thread(target=client).start()\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "served" in result.stdout, result.stderr[-2000:]


def test_a_router_starts_its_threads_when_it_is_made(served, tokenizer, monkeypatch):
    """Python 3.12 starts no thread once the main thread has ended (RuntimeError "can't
    create new thread at interpreter shutdown"), where a script's client threads may still send
    requests: the router starts its compute and batching threads when it is made, and serves
    run, ask and add with no thread started afterwards."""
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer)

    def refused(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", refused)
            router.add("task0", experts["task0"])
            labels = [experts["task0"].label_names[int(row.argmax())] for row in alone["task0"]]
            assert router.ask("task0", TEXTS[1]) == labels[1]
            assert router.run("task0", TEXTS[:2]) == labels[:2]
    finally:
        router.close()
    assert not dk.is_patched(model)


def test_an_expert_that_does_not_fit_is_refused_under_its_task_name(served, tokenizer):
    """add() names the task it was asked for (the expert's own name, from its file, may be
    another, or the default)."""
    model, experts, _ = served
    other = seq_cls_expert(tiny_bert(layers=3), rate=0.5)
    with dk.ExpertRouter(model, tokenizer) as router, \
            pytest.raises(ValueError, match="^task 'topic': "):
        router.add("topic", other)


def test_a_text_that_encodes_to_no_token_is_refused_by_every_path():
    """A causal LM's text that encodes to no token with its template ("{text}" and "", SmolLM2's
    tokenizer) was answered from a padding position, differently by run, run_mixed and ask (its
    batch's). add() takes the expert; run and run_mixed refuse the text, and a submitted one
    fails its own Future while the request batched with it is answered."""
    from test_expert import smollm2_expert

    model, tokenizer, expert = smollm2_expert()
    router = dk.ExpertRouter(model, tokenizer, batch_size=2, batch_window=30)
    try:
        router.add("x", expert)
        expected = router.run("x", "a fine film")
        with pytest.raises(ValueError, match="text 0: '' encodes to no token"):
            router.run("x", "")
        with pytest.raises(ValueError, match="request 1: '' encodes to no token"):
            router.run_mixed([("x", "a fine film"), ("x", "")])
        good, empty = router.submit("x", "a fine film"), router.submit("x", "")  # one batch
        assert [good.result(timeout=60)] == expected
        with pytest.raises(ValueError, match="^'' encodes to no token with the template"):
            empty.result(timeout=60)
        router.batch_window = 0.001
        with pytest.raises(ValueError, match="encodes to no token"):
            router.ask("x", "")
        assert [router.ask("x", "a fine film")] == expected
    finally:
        router.close()
    assert not dk.is_patched(model)


@pytest.mark.parametrize("window", [1e10, threading.TIMEOUT_MAX * 2, float("inf"), -1])
def test_a_batch_window_a_queue_cannot_wait_is_refused(served, tokenizer, window):
    """A batch window past threading.TIMEOUT_MAX made the batching thread's queue.get raise
    OverflowError: refused when the router is made and when it is set."""
    model, _, _ = served
    with pytest.raises(ValueError, match="batch_window must be a number of seconds in"):
        dk.ExpertRouter(model, tokenizer, batch_window=window)
    with dk.ExpertRouter(model, tokenizer, batch_window=threading.TIMEOUT_MAX) as router:
        with pytest.raises(ValueError, match="TIMEOUT_MAX"):
            router.batch_window = window
        assert router.batch_window == threading.TIMEOUT_MAX


def test_a_batch_window_of_any_real_number_type_is_taken(served, tokenizer):
    """numpy scalars and Fractions are numbers of seconds too (as batch_size takes numpy
    integers); a NaN is refused."""
    from fractions import Fraction

    import numpy as np

    model, _, _ = served
    with dk.ExpertRouter(model, tokenizer) as router:
        for window in (np.float32(0.25), np.int64(0), Fraction(1, 100)):
            router.batch_window = window
            assert router.batch_window == float(window)
            assert type(router.batch_window) is float
        with pytest.raises(ValueError, match="batch_window must be a number of seconds"):
            router.batch_window = float("nan")


def test_requests_taken_when_taking_a_batch_fails_get_its_error(served, tokenizer):
    """A request the batching thread had taken when taking its batch failed (a window that
    overflows queue.get, set past the setter's check) was never answered, not even after
    close(): it gets the error, and the thread serves later requests."""
    model, experts, alone = served
    router = dk.ExpertRouter(model, tokenizer, batch_size=2)
    try:
        router.add("task0", experts["task0"])
        router._batch_window = 1e10  # (the setter refuses it)
        with pytest.raises(OverflowError):
            router.submit("task0", TEXTS[0]).result(timeout=60)
        router.batch_window = 0.001
        assert router.ask("task0", TEXTS[0]) == experts["task0"].label_names[
            int(alone["task0"][0].argmax())]
    finally:
        router.close()
    assert not dk.is_patched(model)


def test_a_backend_the_router_cannot_run_is_refused(served, tokenizer):
    """An unknown backend name, or one this machine lacks for the model's device, was taken and
    failed every request: refused when the router is made and when it is set."""
    from doe_kernels.backends import BackendUnavailableError, available_backends

    model, experts, _ = served
    with pytest.raises(ValueError, match="backend must be one of .* got 'nope'"):
        dk.ExpertRouter(model, tokenizer, backend="nope")
    missing = [name for name in ("cuda", "triton") if name not in available_backends("cpu")]
    for name in missing:
        with pytest.raises(BackendUnavailableError, match=f"backend '{name}' is not available "
                           "for the model's cpu tensors"):
            dk.ExpertRouter(model, tokenizer, backend=name)
    with dk.ExpertRouter(model, tokenizer, backend="torch") as router:
        with pytest.raises(ValueError, match="backend must be one of"):
            router.backend = "nope"
        assert router.backend == "torch"
        router.add("task0", experts["task0"])
        assert router.run("task0", TEXTS[0])  # served with the backend it kept
    assert not dk.is_patched(model)


def test_the_model_run_directly_while_a_router_serves_takes_turns_with_it(served, tokenizer):
    """Another thread's forward passes on the served model wait for the router's pass in
    progress (and the router's for them): they get the model between requests (the router's
    keep-everything patch, its own head: the dense model's outputs), and the router's answers
    stay each expert's. (Without the turns the direct passes read an expert plugged for a
    request, and broke the router's mixed passes.) After close() the model holds no hook."""
    model, experts, alone = served
    encoded = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = model(**encoded).logits
    requests = [(f"task{i % 3}", TEXTS[i]) for i in range(5)]
    with dk.ExpertRouter(model, tokenizer) as router:
        for name, expert in experts.items():
            router.add(name, expert)
        served_rows, direct = [], []

        def client():  # (an error leaves served_rows short)
            for _ in range(30):
                served_rows.append(router.run_mixed_logits(requests))
                served_rows.append(router.run_logits("task1", TEXTS[:3]))

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        while thread.is_alive() or not direct:
            with torch.no_grad():
                direct.append(model(**encoded).logits)
        thread.join()
    assert len(served_rows) == 60
    for rows in served_rows[0::2]:
        for (task, text), row in zip(requests, rows):
            torch.testing.assert_close(row, alone[task][TEXTS.index(text)], rtol=0, atol=1e-5)
    for rows in served_rows[1::2]:
        torch.testing.assert_close(rows, alone["task1"][:3], rtol=0, atol=1e-5)
    for logits in direct:
        torch.testing.assert_close(logits, dense, rtol=0, atol=1e-5)
    assert not (model._forward_pre_hooks or model._forward_hooks)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_process_forked_during_a_pass_serves_its_own_requests(served, tokenizer):
    """A fork waits for the router's forward pass in progress: the child's router (on a new
    compute thread) answers as the parent's, where it waited forever for the model's lock,
    copied held by a thread the child lacks."""
    model, experts, alone = served
    expected = experts["task0"].label_names[int(alone["task0"][0].argmax())]
    inside = threading.Event()

    def slow(module, args):
        inside.set()
        time.sleep(0.5)

    with dk.ExpertRouter(model, tokenizer) as router:
        router.add("task0", experts["task0"])
        hook = model.bert.encoder.layer[0].register_forward_pre_hook(slow)
        pending = threading.Thread(target=router.run, args=("task0", TEXTS[0]), daemon=True)
        try:
            pending.start()
            assert inside.wait(60)
            pid = os.fork()
            if pid == 0:  # the child: its exit code says what it got (SIGALRM: it hung)
                code = 1
                try:
                    hook.remove()
                    signal.alarm(60)
                    code = 0 if router.run("task0", TEXTS[0]) == [expected] else 2
                finally:
                    os._exit(code)
        finally:
            hook.remove()
            pending.join(60)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_direct_pass_interrupted_or_nested_keeps_the_turns_right(served, tokenizer):
    """A KeyboardInterrupt inside another thread's forward pass skips the hooks that end its
    turn: that thread's next request to the router (or pass on the model) gives the turn back
    instead of being refused, and other threads' requests are served again. A pass run inside
    that thread's own pass (a hook) keeps the outer pass's turn to its end."""
    model, experts, alone = served
    encoded = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    expected = [experts["task0"].label_names[int(alone["task0"][0].argmax())]]
    layer = model.bert.encoder.layer[0]
    with dk.ExpertRouter(model, tokenizer) as router:
        router.add("task0", experts["task0"])
        guard = router._guard

        def interrupt(module, args):
            raise KeyboardInterrupt

        hook = layer.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(**encoded)
        hook.remove()
        assert router.run("task0", TEXTS[0]) == expected  # (it was refused: "inside a pass")
        answers = []
        thread = threading.Thread(target=lambda: answers.append(router.run("task0", TEXTS[0])),
                                  daemon=True)
        thread.start()
        thread.join(60)
        assert answers == [expected]  # (another thread's request waited for the lost turn)
        held_after_nested = []

        def nested(module, args):
            if not held_after_nested:
                held_after_nested.append(None)
                model(**encoded)
                held_after_nested[0] = guard.lock.locked()

        hook = layer.register_forward_pre_hook(nested)
        with torch.no_grad():
            model(**encoded)
        hook.remove()
        assert held_after_nested == [True] and not guard.lock.locked()
