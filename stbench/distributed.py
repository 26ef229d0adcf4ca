"""`torchrun ... -m stbench run --context-parallel ulysses|ring`: context-parallel training steps, one record per case.

Every rank builds the same model (same seed, then rank 0's weights broadcast) and the same batch; the DiT's
tokens are sharded over the ranks (architectures.attention.context_parallel). Rank 0 writes one record per
case with the usual fields (step times are the slowest rank's, per step) plus per-rank lists.

Failure handling: the process group has a timeout (env STBENCH_DIST_TIMEOUT, seconds, default 300), so a
collective waiting on a dead rank raises instead of hanging. A rank that fails publishes its error in the
rendezvous store; a watchdog thread on every rank polls for it, prints `stbench: error: rank R failed ...`
and ends that rank, and rank 0 first appends an error record for the case (a --resume run goes on after it).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import results, runfolder
from .config import Case, Sweep
from .errors import UserError
from .measure import env, memory, sequence, timing
from .ranks import gather_records, merge_ranks

DEFAULT_TIMEOUT_S = 300.0
FAILURE_KEY = "stbench/failure"
OOM_MARK = "[out of memory]"  # in a published failure: the case is `status: oom` whichever rank records it
POLL_S = 0.2


def timeout_seconds() -> float:
    text = os.environ.get("STBENCH_DIST_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"STBENCH_DIST_TIMEOUT: expected seconds, got {text!r}") from None
    if value <= 0:
        raise UserError(f"STBENCH_DIST_TIMEOUT: must be > 0, got {text!r}")
    return value


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {os.environ.get(name)!r}") from None


def init_process_group(device: str) -> tuple[int, int, str]:
    """NCCL on CUDA (one GPU per local rank), gloo on CPU; returns (rank, world, device)."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    timeout = timedelta(seconds=timeout_seconds())
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device: cuda requested but no CUDA device is available")
        torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return rank, world, device


class FailureWatch:
    """Publishes this rank's failure and ends this rank when another rank publishes one."""

    def __init__(self, rank: int, on_failure=None):
        self.rank, self.on_failure = rank, on_failure
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - without a store only the process-group timeout protects us
            self.store = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="stbench-failure-watch", daemon=True)

    def start(self) -> "FailureWatch":
        if self.store is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # joined: a store call in flight while the process group goes away can abort
            self._thread.join(timeout=10 * POLL_S)

    def publish(self, message: str) -> None:
        if self.store is not None:
            try:
                if not self.store.check([FAILURE_KEY]):
                    self.store.set(FAILURE_KEY, message)
            except Exception:  # noqa: BLE001 - the store host may be gone already
                pass

    def peer_failure(self, wait_s: float = 1.0) -> str | None:
        """Another rank's published failure, waiting up to `wait_s` for it (our own error may be its echo)."""
        deadline = time.monotonic() + wait_s
        while self.store is not None:
            try:
                if self.store.check([FAILURE_KEY]):
                    message = self.store.get(FAILURE_KEY).decode(errors="replace")
                    return None if message.startswith(f"rank {self.rank} failed") else message
            except Exception:  # noqa: BLE001
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_S / 2)
        return None

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                message = self.store.get(FAILURE_KEY).decode(errors="replace")
            except Exception as e:  # noqa: BLE001 - rank 0 (the store's host) died
                message = f"lost contact with rank 0 ({type(e).__name__}: {e})"
            if self._stop.is_set() or message.startswith(f"rank {self.rank} failed"):
                return
            _abort(self.rank, message, self.on_failure)


def _abort(rank: int, message: str, on_failure=None, code: int = 1, linger_s: float = 0.0) -> None:
    """Print one clear line, let rank 0 record the failed case, and end this process now (no teardown hang).

    `linger_s`: a rank that published its own failure stays that long so the others (and, if it is rank 0,
    the store it hosts) can still read the message.
    """
    print(f"stbench: error: {message} (rank {rank} stops; the run ends)", file=sys.stderr, flush=True)
    if on_failure is not None:
        try:
            on_failure(message)
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    time.sleep(linger_s)
    os._exit(code)


def check_case(case: Case, world: int) -> None:
    """Shape conditions every rank can check alike before any collective; ValueError if not met."""
    import architectures

    config = case.model_config()
    tokens = architectures.get(case.arch).tokens(config, case.frames, *case.frame_hw)
    if tokens % world:
        raise ValueError(f"{tokens} video tokens do not split over {world} context-parallel ranks; pick "
                         f"frames/resolution whose token count is a multiple of {world}")
    if case.context_parallel == "ring" and config.attention == "dsv" and (tokens // world) % config.block_size:
        raise ValueError(f"ring + dsv: {tokens // world} tokens per rank is not a multiple of block_size "
                         f"{config.block_size}; pick frames/resolution with whole blocks per rank, or "
                         f"--set block_size=...")
    if case.context_parallel == "ring" and config.attention not in ("full", "dsv"):
        raise ValueError(f"ring context parallelism supports full and dsv self-attention, not attention "
                         f"{config.attention!r}; use ulysses")


def check_layout(case: Case, world: int) -> None:
    """ValueError for a case whose layout or shape cannot run on `world` ranks (run, predict and plan ask)."""
    from .fsdp import layout_of

    cp = layout_of(case, world).cp if case.fsdp is not None else world
    if cp > 1:
        check_case(case, cp)
    if cp > 1 and case.fsdp is not None and getattr(case.model_config(), "attention", None) == "dsv":
        # DSV's estimators step on their own gradients, which context parallelism averages over its ranks; under
        # FSDP2 they are sharded DTensors that this average cannot flatten (the step failed on gloo, issue 23)
        raise ValueError("DSV attention with --fsdp and --context-parallel together is not supported (its "
                         "estimators' gradients are FSDP-sharded); use --context-parallel or --fsdp alone")


def check_sweep(sweep: Sweep, world: int) -> None:
    """UserError, before any process group exists, for a case whose layout or shape cannot run on `world` ranks."""
    for case in sweep.cases:
        try:
            check_layout(case, world)
        except ValueError as e:
            raise UserError(f"--fsdp/--context-parallel for {results.case_slug(case.identity(world))}: {e}") from None


def measure_rank(case: Case, *, repeats: int, warmup: int, world: int) -> dict:
    """One context-parallel case on every rank, through the one measurement sequence; returns the record (each
    rank's own figures; `merge_ranks` makes rank 0's the case's)."""
    from .parallel import make_context_parallel

    device = torch.device(case.device if not case.device.startswith("cuda") else "cuda")
    record = results.new_record(case.identity(world))
    record["env"] = env.collect_env(device)
    cp = make_context_parallel(case.context_parallel)
    step_bytes: list[int] = []
    timed: dict = {}  # the bytes of the timed steps only, taken when timing ends: later passes send bytes too

    def prepare(step):
        cp.broadcast_parameters(step.model)
        cp.attach(step.model, step.optimizer)

        def counted_step():
            before = cp.counter.total
            loss = step()
            step_bytes.append(cp.counter.total - before)
            return loss
        return counted_step

    def after_warmup():
        step_bytes.clear()
        cp.counter.reset()

    def time_steps(fn, n, device):
        times = timing.time_steps(fn, n, device)
        timed.update(step_bytes=list(step_bytes), by_kind=dict(cp.counter.bytes_by_kind))
        return times

    sequence.measure_case(case, record, repeats=repeats, warmup=warmup, prepare=prepare, after_warmup=after_warmup,
                          time_steps=time_steps, settle=False)
    record["comm_bytes"] = sorted(timed["step_bytes"])[len(timed["step_bytes"]) // 2]
    record["comm_bytes_by_kind"] = {k: v // repeats for k, v in timed["by_kind"].items()}
    record["rank_attention_work"] = cp.expected_rank_work()
    return merge_ranks(record, gather_records(record), world)


class _RunState:
    """What rank 0 needs to record a case that fails on some rank."""

    def __init__(self, path: Path | None):
        self.path, self.case, self.written = path, None, False

    def record_failure(self, message: str, status: str = "error") -> None:
        if self.path is None or self.case is None or self.written:
            return
        self.written = True
        status = "oom" if OOM_MARK in message else status
        record = results.new_record(self.case.identity(dist.get_world_size() if dist.is_initialized() else 1))
        record.update(status=status,
                      error=message, env=env.collect_env("cpu"))
        results.append_record(self.path, record)


def _is_collective_error(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        word in text for word in ("gloo", "nccl", "timed out", "connection", "peer"))


def run_sweep_distributed(sweep: Sweep, out, args) -> int:
    """Every rank runs every case of `sweep` together; rank 0 appends the records to OUT/results.jsonl."""
    if sweep.context_parallel is None and sweep.fsdp is None:
        raise UserError("context_parallel: under torchrun (WORLD_SIZE > 1) pass --context-parallel ulysses|ring "
                        "and/or --fsdp N")
    if sweep.compile:
        raise UserError("compile: --compile is not supported with --context-parallel or --fsdp")
    if getattr(args, "isolate", False) or getattr(args, "trace", False):
        raise UserError("--isolate and --trace are not supported with --context-parallel")
    if sweep.device.startswith("cuda:"):
        raise UserError(f"device: {sweep.device!r} under torchrun; pass --device cuda (each rank uses "
                        f"cuda:LOCAL_RANK)")
    check_sweep(sweep, _env_int("WORLD_SIZE", 1))
    rank, world, _ = init_process_group(sweep.device)
    out = Path(out)
    path = out / runfolder.RESULTS_FILE
    state = _RunState(path if rank == 0 else None)
    watch = FailureWatch(rank, on_failure=state.record_failure).start()
    try:
        setup_error, todo_keys = None, None
        if rank == 0:
            try:
                todo_keys = _prepare_out(sweep, out, args)
            except UserError as e:
                setup_error = str(e)
        setup_error, todo_keys = _broadcast((setup_error, todo_keys))
        if setup_error:
            raise UserError(setup_error)
        todo = [c for c in sweep.cases if results.case_key(c.identity(world)) in todo_keys]
        for case in todo:
            state.case, state.written = case, False
            slug = results.case_slug(case.identity(world))
            try:
                if case.fsdp is not None:
                    from .fsdp import measure_rank_fsdp

                    record = measure_rank_fsdp(case, repeats=sweep.repeats, warmup=sweep.warmup, world=world)
                else:
                    record = measure_rank(case, repeats=sweep.repeats, warmup=sweep.warmup, world=world)
            except Exception as e:  # noqa: BLE001 - one rank's failure ends the run on every rank
                detail = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[0][:500]
                traceback.print_exc(file=sys.stderr)
                cause = watch.peer_failure()
                if cause is not None:  # our error is the echo of another rank's (a broken collective)
                    message = f"{cause} [rank {rank} then got: {detail[:200]}]"
                else:
                    message = f"rank {rank} failed in case {slug}: {detail}"
                    if memory.is_out_of_memory(e):
                        message += f" {OOM_MARK}"
                    if _is_collective_error(e):
                        message += (f" (no other rank reported an error: one may have died, e.g. killed or out of "
                                    f"host memory; collectives wait at most STBENCH_DIST_TIMEOUT="
                                    f"{timeout_seconds():.0f}s)")
                    watch.publish(message)
                status = "oom" if memory.is_out_of_memory(e) else "error"
                _abort(rank, message, lambda m: state.record_failure(m, status),
                       linger_s=2 * POLL_S + 0.6 if cause is None else 0.0)
            if rank == 0:
                results.append_record(path, record)
                print(f"ok    {slug}: {record['step_ms_median']:.1f} ms/step, {record['comm_bytes']} B sent "
                      f"per rank per step", file=sys.stderr, flush=True)
            memory.release_memory()
        dist.barrier()
    finally:
        watch.stop()
    if rank == 0:
        layout = (f"fsdp {sweep.fsdp}" if sweep.fsdp else "") + (" x " if sweep.fsdp and sweep.context_parallel else "") \
            + (sweep.context_parallel or "")
        print(f"stbench: {len(todo)} case(s) on {world} ranks ({layout}) -> {path}", file=sys.stderr)
    dist.destroy_process_group()
    return 0


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _prepare_out(sweep: Sweep, out: Path, args) -> set[str]:
    """Rank 0: check/create the run folder like a one-process run; the keys of the cases still to measure."""
    world = dist.get_world_size()
    command = " ".join(["torchrun", "--standalone", f"--nproc-per-node {world}", "-m", "stbench", *sys.argv[1:]])
    path = runfolder.open_run_folder(out, command=command, resume=getattr(args, "resume", False),
                                     settings=sweep.settings())
    done = results.recorded_keys(path)
    keys = {results.case_key(c.identity(world)) for c in sweep.cases}
    return keys - done
