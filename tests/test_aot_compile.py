"""Every Triton kernel specialization compiled ahead of time for real GPUs (issue 11).

No GPU is needed: Triton compiles for a ``GPUTarget`` on any machine, with the
ptxas it ships. The specializations come from the dispatch code itself:
``ddvae_fast.loss.triton.specializations`` (every distinct ``launch_config``:
logit and prob modes, each one-block size and the chunked path, each
NEED_GRAD / NLL combination) times the backend's dtypes (``backends.REGISTRY``),
and ``ddvae_fast.sampling.triton.specializations`` (every sampler kernel for
the seven smoothing kernels, the transforms and Box-Muller). Each is bound
through Triton's own launch binder (``create_function_from_signature`` and
``JITFunction._pack_args``, Triton 3.9 internals), so the signature, the
argument specializations (pointer alignment, integer == 1 or divisible by 16)
and the options are the ones a launch with those arguments would compile.
Triton also specializes on the argument layout, so each loss specialization
is compiled for an aligned contiguous layout (V % 16 == 0, 16-byte aligned
logits: vector loads), an unaligned one (odd V, logits off by one element:
scalar loads) and, for the smallest block, V == 1 (a constant).

Checks per specialization and target (sm_80 = A100, sm_90a = H100/H200):
no local memory at all (cuobjdump's STACK and LOCAL; spills live there, and
Triton's own ``n_spills`` is this local size), shared memory within the
target's per-block limit, registers within what num_warps allows. The figures
go to benchmarks/results/aot_sm80.json and aot_sm90a.json.

The test session runs under TRITON_INTERPRET=1 (tests/conftest.py), where
``@triton.jit`` functions are interpreter objects, so the compiles run in two
worker subprocesses without it (this file run as a script). Compiled kernels
land in Triton's cache (``triton.knobs.cache.dir``, ~/.triton/cache by default)
and the cuobjdump figures in a file next to it, so only changed kernels are
recompiled: on this 2-core box a cold run takes minutes, a warm one seconds.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKERS = 2
# target name -> (compute capability, largest shared memory per block in bytes)
# (CUDA programming guide, compute capabilities table: 163 KB on 8.0, 227 KB on 9.0).
TARGETS = {"sm80": (80, 163 * 1024), "sm90a": (90, 227 * 1024)}
REGISTERS_PER_BLOCK = 65536  # per SM on both targets; a block of num_warps warps shares them
MAX_REGISTERS_PER_THREAD = 255
RESOURCE_CACHE = "ddvae_fast_aot_resources_v2.json"
# Double-precision arithmetic instructions in PTX (the sampler's refill policy).
F64_OP = re.compile(r"\b((?:add|sub|mul|div|sqrt|rcp|rsqrt|fma|mad)(?:\.[a-z0-9]+)*\.f64)\b")


# --------------------------------------------------------------------------- #
# Worker side (no interpreter): enumerate, bind, compile, read the cubin
# --------------------------------------------------------------------------- #
class StandIn:
    """What Triton's binder reads of a tensor: dtype, shape, strides, address."""

    def __init__(self, dtype, shape, offset_elements=0):
        self.dtype, self.shape = dtype, list(shape)
        self._ptr = (1 << 20) + offset_elements * dtype.itemsize  # from a 16-byte aligned base

    def data_ptr(self):
        return self._ptr

    def stride(self, dim=None):
        strides = [1]
        for size in reversed(self.shape[1:]):
            strides.insert(0, strides[0] * size)
        return tuple(strides) if dim is None else strides[dim]


def _loss_jobs():
    import torch

    from ddvae_fast.backends import REGISTRY
    from ddvae_fast.loss import triton as loss_triton

    jobs = []
    for args, kernel, constexprs, num_warps in loss_triton.specializations():
        block_v = constexprs["BLOCK_V"]
        if constexprs["ONE_BLOCK"]:
            layouts = {"aligned": block_v, "unaligned": block_v - 1}
            if block_v == loss_triton.MIN_BLOCK_V:
                layouts["V=1"] = 1
        else:
            # args["vocab"] is the first past the one-block sizes (odd)
            layouts = {"aligned": args["vocab"] + 15, "unaligned": args["vocab"]}
        for layout, vocab in layouts.items():
            # The layout's vocabulary must select this same specialization.
            assert loss_triton.launch_config(**{**args, "vocab": vocab}) == (
                kernel,
                constexprs,
                num_warps,
            )
            for dtype in REGISTRY["relaxed_argmax"]["triton"].dtypes:
                n_rows = 4
                offset = 1 if layout == "unaligned" else 0
                logits = StandIn(dtype, (n_rows, vocab), offset)
                grad_shape = (n_rows, vocab) if constexprs["NEED_GRAD"] else (0,)
                outputs = (
                    StandIn(torch.float32, (n_rows,)),
                    StandIn(torch.float32, (n_rows,)),
                    StandIn(torch.bool, (n_rows,)),
                    StandIn(dtype, grad_shape),
                )
                run_args, run_kwargs = loss_triton.launch_arguments(
                    logits,
                    StandIn(torch.int64, (n_rows,)),
                    StandIn(torch.float32, ()),
                    outputs,
                    0.1,
                    -100,
                    1.0,
                    args["nll_weight"],
                    args["need_nll"],
                )
                jobs.append(
                    dict(
                        family="loss",
                        kernel=kernel,
                        args=run_args,
                        kwargs=dict(
                            run_kwargs,
                            **loss_triton.launch_options(constexprs, num_warps),
                            **constexprs,
                        ),
                        label=dict(
                            constexprs, dtype=str(dtype).removeprefix("torch."), layout=layout
                        ),
                        num_warps=num_warps,
                    )
                )
    return jobs


def _sampler_jobs():
    import torch

    from ddvae_fast.sampling import triton as sampler_triton

    n = 4096
    jobs = []
    for mode, proposal, kernel, constexprs in sampler_triton.specializations():
        # mu and sigma are the caller's (rsample: a contiguous view, which may start
        # anywhere); every other tensor is a fresh allocation, so aligned.
        for layout, offset in (("aligned", 0), ("unaligned", 1)):
            workspace = StandIn(
                torch.int32 if kernel.__name__ == "device_plan_kernel" else torch.int64, (8,)
            )
            tensors = (
                StandIn(torch.int64, (5,)),  # counters
                StandIn(torch.int64, (8,)),  # plan
                workspace,  # per-tile counts (plan kernel) or their running sums (write kernel)
                StandIn(torch.float32, (n,)),  # out (eps)
                StandIn(torch.float32, (n,)),  # z
                StandIn(torch.float32, (n,), offset),  # mu
                StandIn(torch.float32, (n,), offset),  # sigma
                StandIn(torch.float32, (2 * n,)),  # buffer
            )
            # n, seed, first block of the rank, keep_eps, affine, acceptance, 1 - acceptance, cap
            scalars = (n, 2**63 + 5, 2**48, 1, 1, 0.457, 0.543, 8192)
            jobs.append(
                dict(
                    family="sampler",
                    kernel=kernel,
                    args=(*tensors, *scalars),
                    kwargs=dict(sampler_triton.LAUNCH_OPTIONS, **constexprs),
                    label=dict(
                        {k: v for k, v in constexprs.items() if k in ("MODE", "KERNEL", "UNIT")},
                        mode=mode,
                        proposal=proposal,
                        layout=layout,
                    ),
                    num_warps=4,  # Triton's default; TritonSource does not set it
                )
            )
    return jobs


FULL_ENV = "DDVAE_FAST_AOT_FULL"


def all_jobs():
    """Every specialization; by default (CI) the aligned layouts only.

    Alignment changes only the load/store vector width, and the unaligned
    variants compiled within the same resources in the full run (the results
    files). ``DDVAE_FAST_AOT_FULL=1`` compiles every layout and rewrites
    benchmarks/results/aot_<target>.json.
    """
    jobs = _loss_jobs() + _sampler_jobs()
    if os.environ.get(FULL_ENV) != "1":
        jobs = [j for j in jobs if j["label"].get("layout") != "unaligned"]
    return jobs


def bind_and_compile(kernel, args, kwargs, capability):
    """Compile ``kernel`` as ``kernel[grid](*args, **kwargs)`` would on this target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cubin_resources(cubin: bytes, name: str) -> dict:
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    line = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", text).group(1)
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
    return {k.lower(): int(fields[k]) for k in ("REG", "STACK", "LOCAL", "SHARED")}


def _resource_cache_path() -> Path:
    import triton

    return Path(triton.knobs.cache.dir) / RESOURCE_CACHE


def worker(index: int, count: int) -> list[dict]:
    """Compile jobs index, index + count, ... for every target; one record each."""
    import triton

    cache_path = _resource_cache_path()
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    records = []
    jobs = all_jobs()
    for i, job in enumerate(jobs[index::count]):
        for target, (capability, _smem) in TARGETS.items():
            start = time.perf_counter()
            compiled = bind_and_compile(job["kernel"], job["args"], job["kwargs"], capability)
            key = compiled.hash
            if key not in cached:
                cached[key] = _cubin_resources(compiled.asm["cubin"], compiled.metadata.name)
                cached[key]["f64_ops"] = sorted(set(F64_OP.findall(compiled.asm["ptx"])))
            records.append(
                dict(
                    job=index + i * count,
                    family=job["family"],
                    kernel=job["kernel"].__name__,
                    target=target,
                    num_warps=compiled.metadata.num_warps,
                    expected_num_warps=job["num_warps"],
                    triton_shared=compiled.metadata.shared,
                    hash=key,
                    seconds=round(time.perf_counter() - start, 3),
                    **cached[key],
                    **{k: v for k, v in job["label"].items()},
                )
            )
    return [dict(r, triton_version=triton.__version__) for r in records]


# --------------------------------------------------------------------------- #
# Test side
# --------------------------------------------------------------------------- #
def _worker_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return env


def _run_workers() -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), str(WORKERS)],
            env=_worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(WORKERS)
    ]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, err[-4000:]
        records += json.loads(out)
    return records


@pytest.fixture(scope="module")
def compiled_records():
    start = time.perf_counter()
    records = _run_workers()
    elapsed = time.perf_counter() - start
    _update_resource_cache(records)
    if os.environ.get(FULL_ENV) == "1":
        _write_results(records, elapsed)
    return records


def _update_resource_cache(records):
    """Keep the cuobjdump figures per compiled-kernel hash for the next run."""
    env = _worker_env()
    triton_home = Path(env.get("TRITON_HOME") or Path.home()) / ".triton"
    cache_dir = env.get("TRITON_CACHE_DIR") or str(triton_home / "cache")  # Triton's rule
    path = Path(cache_dir) / RESOURCE_CACHE
    cached = json.loads(path.read_text()) if path.exists() else {}
    for r in records:
        cached[r["hash"]] = {k: r[k] for k in ("reg", "stack", "local", "shared", "f64_ops")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached))


def _write_results(records, elapsed):
    RESULTS.mkdir(parents=True, exist_ok=True)
    for target in TARGETS:
        rows = [
            {k: v for k, v in r.items() if k not in ("target", "triton_version")}
            for r in records
            if r["target"] == target
        ]
        report = dict(
            target=target,
            date=datetime.date.today().isoformat(),
            triton_version=records[0]["triton_version"],
            command=f"{FULL_ENV}=1 .venv/bin/python -m pytest -q tests/test_aot_compile.py",
            machine="2-core CI box, no GPU (compile only, ptxas from the Triton wheel)",
            wall_seconds_all_targets=round(elapsed, 1),
            specializations=len(rows),
            max_registers=max(r["reg"] for r in rows),
            max_local_bytes=max(r["stack"] + r["local"] for r in rows),
            max_shared_bytes=max(r["shared"] for r in rows),
            kernels=sorted(rows, key=lambda r: r["job"]),
        )
        (RESULTS / f"aot_{target}.json").write_text(json.dumps(report, indent=1) + "\n")


def test_every_dispatched_specialization_is_compiled(compiled_records):
    # The workers enumerated the dispatchers' specializations; check that nothing
    # was lost and that every family is there.
    targets = {r["target"] for r in compiled_records}
    assert targets == set(TARGETS)
    loss = [r for r in compiled_records if r["family"] == "loss"]
    sampler = [r for r in compiled_records if r["family"] == "sampler"]
    kernels = {r["kernel"] for r in compiled_records}
    assert kernels == {
        "relaxed_argmax_logit_kernel",
        "relaxed_argmax_prob_kernel",
        "device_plan_kernel",
        "device_write_kernel",
    }
    assert {r["dtype"] for r in loss} == {"float32", "bfloat16", "float16"}
    assert {r["ONE_BLOCK"] for r in loss} == {True, False}
    assert {r["proposal"] for r in sampler} >= {
        "uniform",
        "triangular",
        "epanechnikov",
        "quartic",
        "triweight",
        "tricube",
        "cosine",
        "gaussian",
    }
    # One record per job and target, none lost between the workers.
    jobs = {r["job"] for r in compiled_records}
    assert len(compiled_records) == len(jobs) * len(TARGETS)
    assert jobs == set(range(len(jobs)))


def test_no_spills_and_resources_within_limits(compiled_records):
    bad = []
    for r in compiled_records:
        _capability, smem_limit = TARGETS[r["target"]]
        reg_limit = min(MAX_REGISTERS_PER_THREAD, REGISTERS_PER_BLOCK // (32 * r["num_warps"]))
        problems = []
        if r["stack"] or r["local"]:
            problems.append(f"local memory {r['stack']} + {r['local']} B (spills)")
        if max(r["shared"], r["triton_shared"]) > smem_limit:
            problems.append(f"shared {r['shared']} / {r['triton_shared']} B > {smem_limit}")
        if r["reg"] > reg_limit:
            problems.append(f"{r['reg']} registers > {reg_limit}")
        if r["num_warps"] != r["expected_num_warps"]:
            problems.append(f"num_warps {r['num_warps']} != {r['expected_num_warps']}")
        if problems:
            bad.append(f"{r['target']} {r['kernel']} {r}: {'; '.join(problems)}")
    assert not bad, "\n".join(bad[:20])


def test_sampler_refill_policy_is_correctly_rounded_float64(compiled_records):
    # device_plan_kernel (and the short refills of device_write_kernel) size a
    # refill with RejectionSampler's float64 formula, and must get the host's
    # result to the bit: only IEEE round-to-nearest add / mul / div / sqrt, no
    # approximate division or square root, no fused multiply-add (the kernels
    # are launched with enable_fp_fusion=False).
    allowed = {"add.rn.f64", "sub.rn.f64", "mul.rn.f64", "div.rn.f64", "sqrt.rn.f64"}
    sampler = [r for r in compiled_records if r["family"] == "sampler"]
    assert sampler
    for r in sampler:
        assert set(r["f64_ops"]) <= allowed, (r["kernel"], r["proposal"], r["f64_ops"])
        if r["kernel"] == "device_plan_kernel":
            assert {"div.rn.f64", "sqrt.rn.f64"} <= set(r["f64_ops"]), r


@settings(max_examples=300, deadline=None)
@given(
    vocab=st.integers(1, 2**20),
    prob_mode=st.booleans(),
    need_grad=st.booleans(),
    need_nll=st.booleans(),
    nll_weight=st.one_of(st.just(0.0), st.floats(-10, 10)),
    max_block_v=st.sampled_from([16, 64, 8192]),
)
def test_loss_enumeration_covers_every_launch(
    vocab, prob_mode, need_grad, need_nll, nll_weight, max_block_v
):
    # Whatever the caller passes, forward launches one of the enumerated specializations.
    from ddvae_fast.loss import triton as loss_triton

    launched = loss_triton.launch_config(
        vocab, prob_mode, need_grad, need_nll, nll_weight, max_block_v
    )
    enumerated = [tuple(s[1:]) for s in loss_triton.specializations(max_block_v)]
    assert launched in enumerated


def test_sampler_enumeration_covers_every_sampler():
    from ddvae_fast.distributions.smoothing import PROPOSALS
    from ddvae_fast.sampling import triton as sampler_triton
    from ddvae_fast.sampling.sampler import METHODS, RejectionSampler

    enumerated = [(k, c) for _m, _p, k, c in sampler_triton.specializations()]
    covered = set()
    for proposal in PROPOSALS:
        for method in METHODS:
            try:  # every combination RejectionSampler accepts
                sampler = RejectionSampler(
                    proposal, device="cpu", seed=0, backend="reference", method=method
                )
            except ValueError:
                continue
            mode = sampler._mode
            for launch in sampler_triton.launch_config(mode, proposal):
                assert launch in enumerated, (proposal, method)
                covered.add(enumerated.index(launch))
    # ... and nothing is enumerated that no sampler launches.
    assert covered == set(range(len(enumerated)))


# --------------------------------------------------------------------------- #
# 64-bit row offsets, read from the generated TTIR
# --------------------------------------------------------------------------- #
def row_offsets_are_64_bit(ttir: str, pointer_args) -> bool:
    """The predicate: in the kernel's TTIR, every scalar ``tt.addptr`` applied to
    each named pointer argument has an i64 offset, and at least one of those
    offsets is an i64 ``arith.muli`` (program_id * row stride, widened before
    the product). TTIR is where this is checkable: offsets still carry their
    source types there, before LLVM folds them into address arithmetic.
    """
    for name in pointer_args:
        uses = re.findall(rf"tt\.addptr %{name}, %([\w.]+) : !tt\.ptr<[^>]+>, (i\d+)", ttir)
        if not uses or any(ty != "i64" for _, ty in uses):
            return False
        if not any(
            re.search(rf"%{re.escape(value)} = arith\.muli [^\n]*: i64", ttir) for value, _ in uses
        ):
            return False
    return True


_INT32_KERNEL_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def int32_rows(x_ptr, y_ptr, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # stays int32: row * stride_row wraps past 2^31
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + cols)
    tl.store(y_ptr + row * stride_row + cols, x)
"""


def ttir_check() -> dict:
    """Worker side: TTIR of both loss kernels (chunked and one-block) and of a 32-bit control."""
    import importlib.util
    import tempfile

    import torch

    from ddvae_fast.loss import triton as loss_triton

    out = {}
    for prob_mode in (False, True):
        for vocab in (37, loss_triton.MAX_BLOCK_V + 1):
            kernel, constexprs, num_warps = loss_triton.launch_config(
                vocab, prob_mode, True, True, 1.0
            )
            logits = StandIn(torch.bfloat16, (4, vocab))
            outputs = (
                StandIn(torch.float32, (4,)),
                StandIn(torch.float32, (4,)),
                StandIn(torch.bool, (4,)),
                StandIn(torch.bfloat16, (4, vocab)),
            )
            args, kwargs = loss_triton.launch_arguments(
                logits,
                StandIn(torch.int64, (4,)),
                StandIn(torch.float32, ()),
                outputs,
                0.1,
                -100,
                1.0,
                1.0,
                True,
            )
            compiled = bind_and_compile(
                kernel, args, dict(kwargs, num_warps=num_warps, **constexprs), 90
            )
            out[f"{kernel.__name__} V={vocab}"] = compiled.asm["ttir"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int32_rows.py"  # @triton.jit needs the source in a file
        path.write_text(_INT32_KERNEL_SOURCE)
        spec = importlib.util.spec_from_file_location("int32_rows", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        x = StandIn(torch.float32, (4, 64))
        compiled = bind_and_compile(module.int32_rows, (x, x, 64), dict(BLOCK=64), 90)
        out["int32 control"] = compiled.asm["ttir"]
    return out


def test_loss_kernels_use_64_bit_row_offsets():
    result = subprocess.run(
        [sys.executable, __file__, "--ttir"],
        env=_worker_env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ttirs = json.loads(result.stdout)
    control = ttirs.pop("int32 control")
    assert len(ttirs) == 4
    for name, ttir in ttirs.items():
        assert row_offsets_are_64_bit(ttir, ("logits_ptr", "grad_ptr")), name
    # The same predicate rejects a kernel whose row offset is 32-bit.
    assert "tt.addptr %x_ptr" in control
    assert not row_offsets_are_64_bit(control, ("x_ptr", "y_ptr"))


# --------------------------------------------------------------------------- #
# The GPU validation script says clearly that it needs CUDA
# --------------------------------------------------------------------------- #
def test_gpu_check_fails_clearly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a GPU machine
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), result.stderr


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        json.dump(worker(int(sys.argv[2]), int(sys.argv[3])), sys.stdout)
    elif sys.argv[1] == "--ttir":
        json.dump(ttir_check(), sys.stdout)
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
