"""batch_size=auto: the search for the largest micro-batch that fits (nanogpt/parallel/autobatch.py),
the accumulation that keeps the global batch, the config's one-line errors, and a run that uses,
records and resumes with the size it picked. The GPU is the one thing mocked: an allocator, or a
forward pass, that raises torch.OutOfMemoryError above a set size, as CUDA's caching allocator does."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHAKESPEARE, assert_one_line_error, compose, require_shakespeare, run_cli
from nanogpt.config import check_world_size
from nanogpt.errors import ConfigError
from nanogpt.parallel import autobatch
from nanogpt.parallel.distributed import DistEnv


class FakeGPU:
    """An allocator with `capacity` bytes: each Buffer holds its bytes until it is garbage, and an
    allocation beyond what is free raises torch.OutOfMemoryError, as CUDA's does."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.peak = capacity, 0, 0

    def alloc(self, nbytes: int) -> "Buffer":
        if self.used + nbytes > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes "
                                         f"({self.capacity - self.used} free)")
        return Buffer(self, nbytes)


class Buffer:
    def __init__(self, gpu: FakeGPU, nbytes: int):
        self.gpu, self.nbytes = gpu, nbytes
        gpu.used += nbytes
        gpu.peak = max(gpu.peak, gpu.used)

    def __del__(self):
        self.gpu.used -= self.nbytes


PER_SEQUENCE = 1000  # bytes of activations per sequence in the fake step


def fake_step(gpu: FakeGPU, tried: list[int], free_at_start: list[int]):
    """A training step on the fake GPU: activations for `size` sequences, then their gradients
    (the allocation that fails, mid-step, as a real backward does)."""

    def try_size(size: int) -> None:
        free_at_start.append(gpu.used)
        tried.append(size)
        activations = gpu.alloc(size * PER_SEQUENCE // 2)
        gradients = gpu.alloc(size * PER_SEQUENCE // 2)
        del activations, gradients

    return try_size


@pytest.mark.parametrize("limit", [1, 2, 3, 17, 37, 63, 64, 65, 1000])
def test_the_search_finds_the_largest_fitting_size_in_logarithmic_tries(limit):
    cap = 64  # the candidates: every size up to the cap
    gpu = FakeGPU(capacity=limit * PER_SEQUENCE)
    tried, free_at_start = [], []
    search = autobatch.largest_fitting(fake_step(gpu, tried, free_at_start), list(range(1, cap + 1)))
    assert search.size == min(limit, cap)
    assert [size for size, _ in search.tries] == tried
    assert all(fitted == (size <= limit) for size, fitted in search.tries)
    assert tried[0] == 1  # the smallest first: it makes the optimizer's state (below)
    assert len(tried) <= 1 + math.ceil(math.log2(cap)) == 7  # then a binary search, not a scan
    assert free_at_start == [0] * len(tried)  # each try starts with nothing of the previous one left
    assert gpu.used == 0


def test_memory_held_by_the_oom_traceback_is_released_before_the_next_try():
    """The failed try's tensors live on in its traceback: the search must drop the exception."""
    gpu = FakeGPU(capacity=10 * PER_SEQUENCE)
    state = gpu.alloc(2 * PER_SEQUENCE)  # weights and optimizer state: held through the whole search

    def try_size(size: int) -> None:
        assert gpu.used == state.nbytes, f"try {size} started with {gpu.used - state.nbytes} bytes left over"
        activations = gpu.alloc(size * PER_SEQUENCE)  # noqa: F841 - alive in the traceback of an OOM
        if size > 2:
            gpu.alloc(size * PER_SEQUENCE)

    search = autobatch.largest_fitting(try_size, list(range(1, 33)))
    assert search.size == 4  # 2 (state) + 4 + 4 = 10
    assert gpu.used == state.nbytes


def test_every_try_runs_beside_the_optimizer_state_the_first_step_makes():
    """AdamW makes its moments in the first step, after the backward has freed the activations; the
    run's later steps all run beside them. A search whose first try were large would see that
    try fit without them."""
    gpu = FakeGPU(capacity=10 * PER_SEQUENCE)
    optimizer_state = []

    def try_size(size: int) -> None:
        activations = gpu.alloc(size * PER_SEQUENCE)
        del activations  # the backward is done
        if not optimizer_state:
            optimizer_state.append(gpu.alloc(3 * PER_SEQUENCE))

    assert autobatch.largest_fitting(try_size, list(range(1, 33))).size == 7  # 7 + 3 = 10, not 8


def test_after_oom_runs_only_after_a_failed_try():
    gpu = FakeGPU(capacity=5 * PER_SEQUENCE)
    cleaned = []
    search = autobatch.largest_fitting(fake_step(gpu, [], []), [1, 2, 4, 8, 16], after_oom=lambda: cleaned.append(1))
    assert search.size == 4 and len(cleaned) == sum(not fitted for _, fitted in search.tries) == 1


def test_nothing_fits_gives_size_zero():
    search = autobatch.largest_fitting(fake_step(FakeGPU(capacity=0), [], []), [1, 2, 4])
    assert search.size == 0 and search.tries == [(1, False)]


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   ValueError("a bug in the step")])
def test_any_other_error_than_out_of_memory_propagates(error):
    def try_size(size: int) -> None:
        if size > 2:
            raise error

    with pytest.raises(type(error), match=str(error)):
        autobatch.largest_fitting(try_size, list(range(1, 9)))


@pytest.mark.parametrize("global_batch, world_size, divisors", [
    (480, 1, [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48, 60, 80, 96, 120, 160, 240, 480]),
    (480, 2, [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 40, 48, 60, 80, 120, 240]),
    (7, 1, [1, 7]),
    (1, 1, [1]),
    (36, 4, [1, 3, 9]),
])
def test_candidates_are_the_sizes_that_divide_each_process_share(global_batch, world_size, divisors):
    assert autobatch.candidate_sizes(global_batch, world_size) == divisors


@pytest.mark.parametrize("global_batch, world_size, limit, expected", [
    (480, 1, 47, 40),  # 47 fit, 40 is the largest that divides 480: 40 x 12
    (480, 1, 1000, 480),  # everything fits: capped at the process's share, no accumulation
    (480, 2, 47, 40),  # 40 x 6 x 2
    (480, 4, 47, 40),  # share 120: 40 x 3 x 4
    (512, 1, 37, 32),
    (7, 1, 6, 1),  # a prime global batch: 1 x 7
    (36, 4, 8, 3),  # share 9: 3 x 3 x 4
    (24, 1, 1, 1),
])
def test_the_accumulation_keeps_the_global_batch(global_batch, world_size, limit, expected):
    config = compose("train", ["batch_size=auto", f"global_batch_size={global_batch}", "eval_iters=36"])
    from nanogpt.runs.preflight import to_train_config

    config = to_train_config(config)
    assert check_world_size(config, world_size) is None  # auto: the accumulation waits for the search
    gpu = FakeGPU(capacity=limit * PER_SEQUENCE)
    search = autobatch.largest_fitting(fake_step(gpu, [], []), autobatch.candidate_sizes(global_batch, world_size))
    assert search.size == expected
    accumulation = check_world_size(replace(config, batch_size=search.size), world_size)
    assert search.size * accumulation * world_size == global_batch


def _agree_as_rank(rank: int, store_file: str, found: list[int], out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=len(found))
    try:
        env = DistEnv(rank=rank, world_size=len(found))
        (Path(out_dir) / str(rank)).write_text(str(autobatch.agree(found[rank], env)))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_size(tmp_path):
    assert autobatch.agree(24, DistEnv()) == 24
    found = [40, 24, 30]  # what each rank's own search found (another GPU, another neighbour)
    torch.multiprocessing.spawn(_agree_as_rank, args=(str(tmp_path / "store"), found, str(tmp_path)), nprocs=3)
    assert [int((tmp_path / str(rank)).read_text()) for rank in range(3)] == [24, 24, 24]


def test_a_resumed_run_keeps_its_micro_batch_or_says_on_how_many_processes_it_can():
    from nanogpt.errors import UserError
    from nanogpt.train import auto_batch_size

    config = compose_train(["batch_size=auto", "global_batch_size=24"])
    picked = {"resume": {"batch_size": 4}}
    assert auto_batch_size(config, {}, DistEnv(world_size=2), None, picked) == 4  # 4 x 3 x 2: no search
    with pytest.raises(UserError, match=r"picked batch_size=4 .* on 4 processes: continue it on 1, 2, 3, 6 processes"):
        auto_batch_size(config, {}, DistEnv(world_size=4), None, picked)


# --- the config: batch_size is a number or auto, and nothing else ---------------------------------

@pytest.mark.parametrize("value, fragments", [
    ("big", ["batch_size=big is not a batch size", "batch_size=auto"]),
    ("1.5", ["batch_size=1.5 is not a batch size"]),
    ("true", ["batch_size=True is not a batch size"]),
    ("0", ["batch_size=0 must be at least 1"]),
])
def test_a_batch_size_that_is_neither_a_number_nor_auto_is_one_line(tmp_path, value, fragments):
    result = run_cli("nanogpt.train", f"batch_size={value}", "max_iters=1", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing on disk


def test_auto_without_a_global_batch_is_one_line(tmp_path):
    result = run_cli("nanogpt.train", "batch_size=auto", "max_iters=1", cwd=tmp_path)
    assert_one_line_error(result, "batch_size=auto", "set global_batch_size")
    assert list(tmp_path.iterdir()) == []


def test_auto_on_a_cpu_is_refused_before_compute(tmp_path):
    result = run_cli("nanogpt.train", "batch_size=auto", "global_batch_size=24", "hardware=cpu", "max_iters=1",
                     cwd=tmp_path)
    assert_one_line_error(result, "batch_size=auto", "CUDA GPU", "device is cpu", "set batch_size to a number")
    assert list(tmp_path.iterdir()) == []


def test_auto_with_a_global_batch_the_processes_cannot_share_is_one_line(tmp_path):
    result = run_cli("nanogpt.train", "batch_size=auto", "global_batch_size=25", "hardware=ddp",
                     "hardware.nproc_per_node=2", "max_iters=1", cwd=tmp_path)
    assert_one_line_error(result, "global_batch_size=25 is not a multiple of the 2 processes", "global_batch_size=24")


def test_cfg_job_shows_auto(tmp_path):
    result = run_cli("nanogpt.train", "batch_size=auto", "global_batch_size=480", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = OmegaConf.create(result.stdout)
    assert (shown.batch_size, shown.global_batch_size) == ("auto", 480)


def test_bench_refuses_auto():
    """On a CPU the device check answers first (as for nanogpt-train); on a GPU, the benchmark's own."""
    from nanogpt.bench import run_benchmark
    from nanogpt.runs.preflight import to_train_config

    config = to_train_config(compose("bench", ["batch_size=auto", "global_batch_size=8", "bench.real_data=false"]))
    with pytest.raises(ConfigError, match="^nanogpt-bench times the batch_size it is given"):
        run_benchmark(config)


# --- a run: the search with the real model and optimizer, a GPU mocked by the forward's OOM -------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require_shakespeare()
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def gpu_fits(monkeypatch):
    """A GPU on which a forward of more than `limit[0]` sequences runs out of memory; the sizes it saw."""
    from nanogpt.model import GPT

    limit, seen = [0], []
    forward = GPT.forward

    def limited(self, idx, targets=None, *args, **kwargs):
        seen.append(idx.shape[0])
        if idx.shape[0] > limit[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, idx, targets, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", limited)
    return limit, seen


def train_in_process(run_dir, data_dir, overrides: list[str], resume: bool = False) -> dict:
    """nanogpt.train.train() in this process, as nanogpt-train calls it (test_switches.py's way)."""
    from nanogpt.runs.checkpoint import CheckpointDir
    from nanogpt.runs.preflight import check_data_and_vocab, to_train_config
    from nanogpt.train import train

    cfg = compose("train", [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", "hardware=cpu", "model.n_layer=1",
                            "model.n_head=2", "model.n_embd=32", "model.block_size=16", "global_batch_size=8",
                            "eval_interval=3", "eval_iters=1", "optim.warmup_iters=2", "hardware.peak_flops=1e11",
                            *overrides])
    config = to_train_config(cfg)
    resume_from = CheckpointDir(run_dir / "checkpoints").load_latest_good()[0] if resume else None
    run_dir.mkdir(exist_ok=True)
    return train(config, run_dir, check_data_and_vocab(config), OmegaConf.to_container(cfg, resolve=True), resume_from)


def weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.slow  # three short runs: 10-30 s
def test_a_run_with_auto_trains_as_the_size_it_picked_and_resumes_with_it(tmp_path, data_dir, gpu_fits, caplog):
    limit, seen = gpu_fits
    limit[0] = 3  # of 1, 2, 4, 8 (the divisors of 8): 2 fits, 4 does not
    caplog.set_level("INFO", logger="nanogpt")
    auto = train_in_process(tmp_path / "auto", data_dir, ["batch_size=auto", "max_iters=6"])
    assert (auto["batch_size"], auto["grad_accum"]) == (2, 4)
    line = [r.message for r in caplog.records if r.message.startswith("batch_size=auto")]
    assert line == ["batch_size=auto: 2 sequences per micro-step x 4 micro-steps x 1 processes = global_batch_size 8 "
                    "(tried 1 ok, 4 OOM, 2 ok)"]  # once
    assert weights(tmp_path / "auto")["resume"]["batch_size"] == 2

    # the search left no trace in the run: the same weights as batch_size=2 given by hand
    by_hand = train_in_process(tmp_path / "by_hand", data_dir, ["batch_size=2", "max_iters=6"])
    assert by_hand["val_loss"] == auto["val_loss"]
    for name, tensor in weights(tmp_path / "by_hand")["model"].items():
        assert torch.equal(tensor, weights(tmp_path / "auto")["model"][name]), name

    # stopped at 3 and continued where more would fit: the run keeps its micro-batch (no search), and
    # so its data order, and ends as the run that never stopped
    train_in_process(tmp_path / "resumed", data_dir, ["batch_size=auto", "max_iters=3", "optim.decay_iters=6"])
    limit[0], seen[:] = 8, []
    resumed = train_in_process(tmp_path / "resumed", data_dir, ["batch_size=auto", "max_iters=6",
                                                                "optim.decay_iters=6"], resume=True)
    assert resumed["batch_size"] == 2 and set(seen) == {2}
    for name, tensor in weights(tmp_path / "auto")["model"].items():  # the run that never stopped
        assert torch.equal(tensor, weights(tmp_path / "resumed")["model"][name]), name


def test_a_gpu_that_fits_not_one_sequence_is_one_line(tmp_path, data_dir, gpu_fits):
    from nanogpt.errors import UserError

    gpu_fits[0][0] = 0
    with pytest.raises(UserError, match=r"^batch_size=auto: not even one sequence of block_size=16 fits a training "
                                        r"step on cpu: lower block_size or the model size$"):
        train_in_process(tmp_path / "none", data_dir, ["batch_size=auto", "max_iters=1"])


def test_the_choice_is_recorded_in_provenance_and_the_sweep_report(tmp_path, data_dir):
    """Through nanogpt-train: provenance.json records each start's micro-batch and accumulation,
    and nanogpt-report shows them (a CPU run with a number; auto records the same fields)."""
    from conftest import TINY, report_rows

    args = [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", *TINY, "batch_size=2", "global_batch_size=8",
            "max_iters=2", "eval_interval=2"]
    result = run_cli("nanogpt.train", *args, "hydra.run.dir=runs/a", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "runs" / "a" / "provenance.json").read_text())
    assert (record["batch_size"], record["grad_accum"]) == (2, 4)
    report = run_cli("nanogpt.sweeps.report", str(tmp_path / "runs"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert report_rows(report.stdout)[0][-1] == "2 x 4"


def test_the_device_check_names_mps():
    config = compose_train(["batch_size=auto", "global_batch_size=8"])
    with pytest.raises(ConfigError, match="device is mps"):
        autobatch.check_device(config, "mps")
    autobatch.check_device(config, "cuda")  # where it runs
    autobatch.check_device(replace(config, batch_size=8), "cpu")  # a number runs anywhere


def compose_train(overrides: list[str]):
    from nanogpt.runs.preflight import to_train_config

    return to_train_config(compose("train", overrides))


def test_a_run_that_runs_out_later_is_told_to_set_a_number():
    """The trial steps fitted and the run did not (fragmentation, evaluation): one line with the way out."""
    from nanogpt.parallel.memory import out_of_memory_error

    config = compose_train(["batch_size=auto", "global_batch_size=480", "block_size=64"])
    line = str(out_of_memory_error(config, "CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert line == ("the run ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB) with the micro-batch "
                    "batch_size=auto picked (its log names it) x block_size=64: set batch_size to a number below it "
                    "(global_batch_size keeps the global batch)")
