"""The transports (sj_temporal_fusion/distributed/: transport.py's interface, torch_transport.py,
nccl_transport.py, cuda_streams.py, registry.py) under NCCL's rules on the CPU.

``_nccl_emulation`` stands in for CuPy's ``nccl`` module and the CUDA streams, so the CuPy NCCL
transport itself runs here: messages pair by issue order with tags ignored (the node's protocol
must never let one rank send a message its peer does not expect), messages to the rank itself
pair within one group or are refused, CuPy 14's and CuPy 13's set-up signatures, ranks on
different devices, a missing library, ranks that never answer, failures inside an NCCL group, the
watchdog's device and its abort racing an enqueue. A CUDA device without an index goes through
every place that selects a device, up to the CUDA call."""
from __future__ import annotations

import time

import pytest
import torch

import _nccl_emulation as emu
from _group import results_ok, run_group
from _parity import assert_mismatches_named, assert_ranks_match, mismatch_worker, parity_cases, parity_worker


def _install(rank, k, timeout=30.0, device=None, **emulation):
    """This rank's CPU tensors go through NcclTransport over the emulation; returns it."""
    from sj_temporal_fusion.distributed.registry import use_transport
    t = emu.nccl_transport(device or torch.device("cpu"), timeout, **emulation)
    use_transport(t, torch.device("cpu"))
    return t


# ---------------------------------------------------------------- the node's protocol, NCCL rules

def _nccl_rules_worker(rank, k, api, cases):
    import sj_temporal_fusion  # noqa: F401
    from spikingjelly.activation_based import neuron
    from sj_temporal_fusion.distributed import TimeShardedNode, time_slice
    t = _install(rank, k, api=api)
    problems, _ = parity_worker(rank, k, cases)
    # The slice length changes between calls that continue the state (T 5 -> 6 -> 9): only some
    # ranks' slice shapes change, so a header sent only on a shape change would shift every
    # later message on a pair.
    ref = neuron.LIFNode(tau=1.5, v_threshold=0.4, step_mode="m", backend="temporal_fusion")
    node = TimeShardedNode(neuron.LIFNode(tau=1.5, v_threshold=0.4, step_mode="m"), name="nccl.T",
                           timeout=30)
    g = torch.Generator().manual_seed(7)
    for T in (5, 6, 9, 6):
        x = torch.randn(T, 3, 11, generator=g) * 0.6 + 0.3
        with torch.no_grad():
            want = ref(x)
            got = node(x[time_slice(T, rank, k)])
        if not torch.equal(got, want[time_slice(T, rank, k)]):
            problems.append(f"T={T} after a change of slice length: spikes differ")
    t.flush()
    return problems, t.comm.violations


@pytest.mark.slow  # process groups
@pytest.mark.parametrize("k,api", [(2, 14), (3, 13)])
def test_node_protocol_under_nccl_pairing_rules(k, api, tmp_path, parity_variants_built):
    """A third of the gloo parity grid (every kind, reset and dtype; forward, backward, a
    continued second call) over the CuPy NCCL transport with NCCL's pairing rules. Its host
    variants are built in batches first, as for the gloo grid (one at a time in the ranks they
    took a minute)."""
    cases = parity_cases(k)[::3]
    results = results_ok(run_group(k, _nccl_rules_worker, api, cases, tmp_path=tmp_path))
    assert_ranks_match(results, k)
    assert all(not results[r][1] for r in results), results


def _mismatch_under_nccl_worker(rank, k):
    _install(rank, k, timeout=20)
    return mismatch_worker(rank, k)


@pytest.mark.slow  # process groups
def test_mismatches_are_clear_errors_on_both_sides_under_nccl_rules(tmp_path):
    results = results_ok(run_group(2, _mismatch_under_nccl_worker, tmp_path=tmp_path, timeout=120))
    assert_mismatches_named(results)


# ---------------------------------------------------------------- communicator set-up

def _setup_worker(rank, k, api, available):
    from sj_temporal_fusion.distributed import TimeShardingError
    start = time.monotonic()
    try:
        # Ranks sit on different GPUs: the id must not be published under a device-specific key.
        t = _install(rank, k, timeout=10, device=torch.device("cuda", rank), api=api,
                     available=available[rank])
    except TimeShardingError as exc:
        return "TimeShardingError", str(exc), time.monotonic() - start
    mine = torch.full((1000,), float(rank))
    theirs = torch.empty(1000)
    peer = (rank + 1) % k
    t.exchange([(mine, peer, "id test")], [(theirs, (rank - 1) % k, "id test")], 0, 10, complete=True)
    return "ok", theirs[0].item(), time.monotonic() - start


@pytest.mark.slow  # process groups
@pytest.mark.parametrize("api", [14, 13])
def test_communicator_set_up_with_cupy_14_and_13_signatures(api, tmp_path):
    results = results_ok(run_group(2, _setup_worker, api, [True, True], tmp_path=tmp_path, timeout=90))
    for rank, (status, value, _) in results.items():
        assert status == "ok", value
        assert value == float((rank - 1) % 2)


@pytest.mark.slow  # process groups
def test_missing_nccl_is_named_on_every_rank(tmp_path):
    results = results_ok(run_group(2, _setup_worker, 14, [True, False], tmp_path=tmp_path, timeout=90))
    for rank, (status, message, elapsed) in results.items():
        assert status == "TimeShardingError", (rank, message)
        assert "rank 1: CuPy found no NCCL library" in message and "nvidia-nccl" in message, message
        assert elapsed < 10, f"rank {rank} waited {elapsed:.1f} s to learn it"


def _silent_worker(rank, k, where):
    from sj_temporal_fusion.distributed import TimeShardingError
    start = time.monotonic()
    if rank == 1 and where == "check-in":
        time.sleep(20)  # never reaches the set-up within the others' timeout
        return "slept", "", 0.0
    if where == "collective":  # the CuPy transport's collectives go through torch.distributed
        t = _install(rank, k, timeout=3)
        if rank == 1:
            time.sleep(20)  # never joins the all-reduce
            return "slept", "", 0.0
        start = time.monotonic()
        try:
            t.all_reduce_(torch.ones(3), "a sum rank 1 never joins", 3.0)
        except TimeShardingError as exc:
            return "TimeShardingError", str(exc), time.monotonic() - start
        return "finished", "", time.monotonic() - start
    try:
        _install(rank, k, timeout=3, init_delay_s=20 if (rank == 1 and where == "init") else 0.0)
    except TimeShardingError as exc:
        return "TimeShardingError", str(exc), time.monotonic() - start
    return "finished", "", time.monotonic() - start


@pytest.mark.slow  # process groups
@pytest.mark.parametrize("where", ["check-in", "init", "collective"])
def test_waits_are_bounded_when_a_rank_never_answers(where, tmp_path):
    """A rank that never checks in, whose ncclCommInitRank never returns, or that never joins a
    collective: the others fail within their timeout (3 s), naming the step, instead of hanging
    in the store, in NCCL or in the process group's own (longer) timeout."""
    results = run_group(2, _silent_worker, where, tmp_path=tmp_path, timeout=60, expect_dead=(1,))
    status, payload = results[0]
    assert status == "ok", payload
    kind, message, elapsed = payload
    assert kind == "TimeShardingError", (kind, message)
    assert elapsed < 3 + 5, f"rank 0 took {elapsed:.1f} s: {message}"
    assert {"check-in": "rank1", "init": "ncclCommInitRank", "collective": "a sum rank 1 never joins"}[where] \
        in message, message


# ---------------------------------------------------------------- one rank: waits, groups, watchdog

def _one_rank_worker(rank, k, scenario):
    from sj_temporal_fusion.distributed import TimeShardingError
    t0 = time.monotonic()
    if scenario == "receive from itself":
        # NCCL refuses at once a receive from the rank itself without a send to itself in the
        # same group (ncclInvalidUsage): an error at once, and again at every later call.
        t = _install(rank, k)
        out = []
        for attempt in range(2):
            try:
                t.exchange([], [(torch.empty(4), 0, "a receive from itself")], 0, 30.0, complete=True)
                out.append(("returned", "", time.monotonic() - t0))
            except TimeShardingError as exc:
                out.append(("TimeShardingError", str(exc), time.monotonic() - t0))
        return out, t.nccl.open_groups(), t.comm.aborted
    if scenario == "failure inside a group":
        t = _install(rank, k, fail_on_send=1)
        try:
            t.exchange([(torch.ones(4), 0, "s")], [(torch.empty(4), 0, "r")], 0, 5.0)
            raised = None
        except TimeShardingError as exc:
            raised = str(exc)
        try:  # the transport knows it is out of step and says so, instead of hanging
            t.exchange([(torch.ones(4), 0, "s")], [(torch.empty(4), 0, "r")], 0, 5.0)
            again = None
        except TimeShardingError as exc:
            again = str(exc)
        return raised, again, t.nccl.open_groups()
    if scenario == "watchdog device":
        t = _install(rank, k)
        x, y = torch.ones(8), torch.empty(8)
        t.exchange([(x, 0, "s")], [(y, 0, "r")], 0, 5.0, complete=True)
        time.sleep(0.1)
        watchdog = t._thread.ident
        return (watchdog in t.streams.query_threads, watchdog in t.streams.device_threads)
    if scenario == "stuck in groupEnd":
        # The host stays inside NCCL for 3 s per operation (a first operation with a peer sets
        # up its connection in groupEnd) with a timeout of 1 s: the watchdog must see it.
        t = _install(rank, k, enqueue_delay_s=3.0)
        try:
            t.exchange([(torch.ones(4), 0, "s")], [(torch.empty(4), 0, "first contact")], 0, 1.0)
            return "returned", time.monotonic() - t0
        except TimeShardingError as exc:
            return str(exc), time.monotonic() - t0
    if scenario == "asynchronous error":
        # A send of 16 bytes meets a receive of 32: NCCL reports it asynchronously; the watchdog
        # must notice it long before the 30 s timeout.
        t = _install(rank, k)
        try:
            t.exchange([(torch.ones(4), 0, "s")], [(torch.empty(8), 0, "r")], 0, 30.0)
            time.sleep(1.0)
            t.flush()
            return "no error", time.monotonic() - t0
        except TimeShardingError as exc:
            return str(exc), time.monotonic() - t0
    raise ValueError(scenario)


def _one_rank(scenario, tmp_path):
    return results_ok(run_group(1, _one_rank_worker, scenario, tmp_path=tmp_path, timeout=60))[0]


def _silent_peer_worker(rank, k, scenario):
    """Rank 0 runs ``scenario`` against rank 1, which sets up its communicator and then sends and
    receives nothing until rank 0 is done (NCCL refuses a lone message to the rank itself, so a
    wait that must time out needs a peer)."""
    import torch.distributed as dist
    from sj_temporal_fusion.distributed import TimeShardingError
    t = _install(rank, k, timeout=30.0)
    result = None
    if rank == 0:
        t0 = time.monotonic()
        if scenario == "lone receive":
            header = torch.full((18,), -7, dtype=torch.int64)
            result = []
            for attempt in range(2):  # the first raises after the timeout, the second at once
                try:
                    t.exchange([], [(header, 1, "a header nobody sends")], 0, 1.0, complete=True)
                    result.append(("returned", header.tolist(), time.monotonic() - t0))
                except TimeShardingError as exc:
                    result.append(("TimeShardingError", str(exc), time.monotonic() - t0))
        elif scenario == "abort during enqueue":
            # A lone receive times out at 1.0 s while the host spends 0.5 .. 2.5 s enqueueing
            # another operation: the watchdog must not abort the communicator under it.
            t.recv(torch.empty(4), 1, 0, "lone", 1.0)
            time.sleep(0.5)
            t.nccl.enqueue_delay_s = 2.0
            try:
                t.recv(torch.empty(4), 1, 0, "slow to enqueue", 30.0)
            except TimeShardingError:
                pass
            time.sleep(0.5)  # the watchdog records the error, then aborts once the enqueue is done
            result = str(t.error), t.comm.violations, t.comm.aborted
        elif scenario == "flush":
            # A send alone (side stream) that nobody receives: flush must wait for it, bounded.
            t.send(torch.ones(4), 1, 0, "unreceived send", 1.0)
            try:
                t.flush()
                result = "returned", time.monotonic() - t0
            except TimeShardingError as exc:
                result = str(exc), time.monotonic() - t0
        else:
            raise ValueError(scenario)
    dist.barrier()  # rank 1 stays silent until rank 0 is done
    return result


def _rank0_against_silent_peer(scenario, tmp_path):
    return results_ok(run_group(2, _silent_peer_worker, scenario, tmp_path=tmp_path, timeout=60))[0]


@pytest.mark.slow  # process groups
def test_lone_receive_times_out_and_never_hands_out_garbage(tmp_path):
    (first, msg1, t1), (second, msg2, t2) = _rank0_against_silent_peer("lone receive", tmp_path)
    assert first == second == "TimeShardingError", (msg1, msg2)
    assert "a header nobody sends" in msg1 and "did not complete" in msg1, msg1
    assert 0.9 < t1 < 8.0, t1
    assert t2 - t1 < 0.5 and msg2 == msg1


@pytest.mark.slow  # process groups
def test_receive_from_itself_without_a_send_is_refused_at_once(tmp_path):
    """As NCCL refuses it (ncclInvalidUsage at ncclGroupEnd), not queued until a timeout."""
    ((first, msg1, t1), (second, msg2, _)), open_groups, aborted = _one_rank("receive from itself", tmp_path)
    assert first == second == "TimeShardingError", (msg1, msg2)
    assert "NCCL refused a receive from itself" in msg1 and "NCCL_ERROR_INVALID_USAGE" in msg1, msg1
    assert t1 < 1.0, f"refused after {t1:.1f} s: the receive was queued, not refused"
    assert msg2 == msg1 and open_groups == 0 and aborted


def test_emulation_pairs_messages_to_itself_within_one_group_only():
    """NCCL's rule, in the emulation itself: a receive from the rank itself needs a send to
    itself in the same group (and the reverse); a lone operation is a group of one; a refused
    group runs nothing."""
    nccl = emu.EmulatedNccl()
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    streams = emu.HostStreams()
    stream = streams.current()
    sent, got = torch.arange(4.0), torch.full((4,), -1.0)

    def op(kind, t):
        fn = comm.send if kind == "send" else comm.recv
        fn(t.data_ptr(), t.numel() * t.element_size(), nccl.NCCL_UINT8, 0, stream.handle)

    for lone in ("recv", "send"):
        with pytest.raises(emu.NcclError, match=f"INVALID_USAGE.*Trying to {lone} to self without a matching"):
            op(lone, got if lone == "recv" else sent)
    for first, second in (("send", "recv"), ("recv", "send")):  # in two groups: each refused
        for kind in (first, second):
            nccl.groupStart()
            op(kind, got if kind == "recv" else sent)
            with pytest.raises(emu.NcclError, match="INVALID_USAGE"):
                nccl.groupEnd()
    assert nccl.open_groups() == 0 and stream.ops == [] and bool((got == -1).all())
    nccl.groupStart()  # in one group, either order: delivered
    op("recv", got)
    op("send", sent)
    nccl.groupEnd()
    assert torch.equal(got, sent) and streams.done(streams.record(stream))


@pytest.mark.slow  # process groups
def test_failure_inside_an_nccl_group_closes_the_group(tmp_path):
    raised, again, open_groups = _one_rank("failure inside a group", tmp_path)
    assert raised is not None and "injected failure" in raised, raised
    assert open_groups == 0, "groupStart without groupEnd: every later NCCL call of the thread hangs"
    assert again is not None and "injected failure" in again


@pytest.mark.slow  # process groups
def test_watchdog_selects_the_device_before_querying_events(tmp_path):
    queried, selected = _one_rank("watchdog device", tmp_path)
    assert queried and selected


@pytest.mark.slow  # process groups
def test_watchdog_abort_does_not_race_an_enqueue(tmp_path):
    raised, violations, aborted = _rank0_against_silent_peer("abort during enqueue", tmp_path)
    assert violations == [], violations
    assert aborted and "lone failed" in raised, raised


@pytest.mark.slow  # process groups
def test_asynchronous_nccl_errors_are_polled(tmp_path):
    message, elapsed = _one_rank("asynchronous error", tmp_path)
    assert "asynchronous error" in message, message
    assert elapsed < 10, elapsed


@pytest.mark.slow  # process groups
def test_flush_waits_for_side_stream_sends(tmp_path):
    message, elapsed = _rank0_against_silent_peer("flush", tmp_path)
    assert "unreceived send" in message, message
    assert 0.9 < elapsed < 8.0, elapsed


@pytest.mark.slow  # process groups
def test_watchdog_sees_a_host_stuck_inside_nccl(tmp_path):
    message, elapsed = _one_rank("stuck in groupEnd", tmp_path)
    assert "stuck on the host inside NCCL" in message, message
    assert elapsed < 10, elapsed  # the emulation holds the host 3 s per operation, two operations


# ---------------------------------------------------------------- devices without an index

@pytest.fixture
def cuda_calls(monkeypatch):
    """CUDA's device calls, recorded on the CPU: the current device is 3, and set_device refuses
    a CUDA device without an index as torch.cuda.set_device does (ValueError)."""
    selected = []

    def set_device(device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        selected.append(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return selected


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    from sj_temporal_fusion.distributed.registry import _forget_transports
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        _forget_transports()
        dist.destroy_process_group()


def test_a_cuda_device_without_index_is_pinned_where_it_is_named(cuda_calls, one_rank_group):
    """torch.device('cuda') through the NCCL transport's init and watchdog threads (the real
    CudaStreams, up to torch.cuda.set_device), the torch transport and the registry's key."""
    from sj_temporal_fusion.distributed import registry
    from sj_temporal_fusion.distributed.nccl_transport import NcclTransport
    from sj_temporal_fusion.distributed.torch_transport import TorchTransport
    cuda = torch.device("cuda")
    t = NcclTransport(None, cuda, 10.0, nccl=emu.EmulatedNccl())
    time.sleep(0.1)  # the watchdog thread selects the device first thing
    t.close()
    assert t.device == t.streams.device == torch.device("cuda", 3)
    assert cuda_calls == [torch.device("cuda", 3)] * 2, cuda_calls  # ncclCommInitRank's thread, the watchdog's
    assert TorchTransport(None, cuda).device == torch.device("cuda", 3)
    registry.use_transport(t, cuda)
    assert registry.transport_for(torch.device("cuda", 3), None) is t


def test_the_smoke_run_selects_an_indexed_device(cuda_calls, monkeypatch, capsys):
    from sj_temporal_fusion.distributed import smoke
    seen = []
    monkeypatch.setattr(smoke, "STAGES", [("device", lambda device, n, make_nccl: seen.append(device) or "ok")])
    monkeypatch.setattr(smoke, "_ensure_group", lambda device: None)
    result = smoke.run("cuda", log=lambda line: None)
    assert result["ok"], result
    assert cuda_calls == seen == [torch.device("cuda", 3)]
