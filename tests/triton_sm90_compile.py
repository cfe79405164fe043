"""Compile the Triton kernels for an H100/H200 (sm_90) on a machine without a GPU (used by
tests/test_triton_sm90_compile.py, in two child processes).

    python tests/triton_sm90_compile.py record OUT.json    # TRITON_INTERPRET=1: run the public ops on small
                                                            # CPU tensors, record every kernel launch
    python tests/triton_sm90_compile.py compile IN.json    # no interpreter: compile each recorded
                                                            # specialisation for sm_90 at the fixed tile
                                                            # (the autotuner's first GPU candidate); print JSON
                                                            # (shared memory, and whether the PTX has wgmma)

The interpreter runs kernels without compiling them, so it misses what only the compiler and the
hardware limits check. On an H200 that was the shared memory of the fp64 SVGD kernel (256 KiB at the
fixed 64 x 64 tile; sm_90 allows 227 KiB), which this compile reproduces on a CPU, and a refusal of Triton
3.6 (an fp64 accumulator with tl.dot's default fp32 out_dtype) that the Triton installed here accepts.
Compiling needs no GPU: Triton's NVIDIA backend (with its bundled ptxas) compiles for a named target.
"""

from __future__ import annotations

import importlib
import json
import sys

SHARED_LIMIT_SM90 = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)
REGISTER_CHECKED = {"_svgd_flash_kernel"}  # kernels whose register use and spills are reported (ptxas -v)


def record(path: str) -> None:
    import torch
    import triton.runtime.interpreter as interpreter

    import bmt_fast
    from bmt_fast import backends

    launches: dict[str, dict] = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        params = {}
        for name, value in bound.items():
            if name not in self.arg_names:  # launch options: num_warps, num_stages
                continue
            # "aligned": what a GPU launch specialises on (16-byte aligned pointers, integers divisible by
            # 16); the compiler vectorises loads and pipelines them through shared memory only with it
            if isinstance(value, torch.Tensor):
                params[name] = {"ptr": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
            elif isinstance(value, bool) or hasattr(value, "primitive_bitwidth") or name.isupper():
                params[name] = {"const": value if isinstance(value, (bool, int, float)) else str(value)}
            else:
                params[name] = {"int": int(value), "aligned": int(value) % 16 == 0}
        entry = {"module": self.fn.__module__, "name": self.fn.__name__, "params": params}
        key = {**entry, "params": {k: v for k, v in params.items() if "int" not in v or v["aligned"]}}  # one per specialisation
        launches.setdefault(json.dumps(key, sort_keys=True), entry)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    triton_backend = backends.get("triton")
    # (bf16 takes one bf16 product whatever allow_tf32 but False; fp16 by default the split products)
    for dtype, modes in ((torch.float32, (None, True)), (torch.float64, (None,)), (torch.bfloat16, (None,)),
                         (torch.float16, (None,))):
        for allow_tf32 in modes:
            triton_backend.allow_tf32 = allow_tf32
            for n, d in ((70, 37), (8, 300)):  # both regimes: tiled and Gram
                x = torch.randn(n, d).to(dtype)
                score = torch.randn(n, d).to(dtype)
                bmt_fast.svgd_step(x, score, backend="triton")  # median rule
                bmt_fast.svgd_step(x, score, 40.0, backend="triton")  # Gram path: the kernel notes finiteness
                bmt_fast.svgd_step(x, score, 40.0, backend="triton", check_inputs=False)  # ... and without
                y = x[: n // 2 + 1].clone().requires_grad_(dtype.itemsize >= 4)
                xg = x.clone().requires_grad_(dtype.itemsize >= 4)
                k = bmt_fast.rbf_kernel(xg, y, 40.0, backend="triton")
                if xg.requires_grad:
                    k.sum().backward()
                    # a self kernel's one symmetrised pass, grad expanded (K.sum()) and dense
                    xs = x.clone().requires_grad_(True)
                    bmt_fast.rbf_kernel(xs, None, 40.0, backend="triton").sum().backward()
                    (bmt_fast.rbf_kernel(xs, None, 40.0, backend="triton") * torch.randn(n, n).to(dtype)).sum().backward()
    triton_backend.allow_tf32 = None
    kernels = triton_backend.kernels()
    # rbf_kernel's tiled kernel (up to 256 rows, x's and y's together, the Gram pass serves it), both forms
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x, y = torch.randn(70, 37).to(dtype), torch.randn(36, 37).to(dtype)
        h = torch.tensor(40.0)
        for allow_tf32 in (None, True) if dtype == torch.float32 else (None,):
            kernels.rbf_kernel_forward(x, y, h, algorithm="tiled", allow_tf32=allow_tf32)
            kernels.rbf_kernel_forward(x, x, h, self_kernel=True, algorithm="tiled", allow_tf32=allow_tf32)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(300, 16, dtype=dtype)  # above the Gram limit: the radix-select median
        bmt_fast.median_bandwidth(x, backend="triton")
        h = torch.tensor(40.0, dtype=dtype)
        kernels.svgd_step_forward(x, torch.randn(300, 16, dtype=dtype), h, splits=2)  # the combine kernel
    # The flash path (many particles, tensor-core modes) at the shape of the bf16 target row's d = 128
    # (n, d and the strides divisible by 16, as there), whole and with column splits.
    for dtype, allow_tf32 in ((torch.float32, True), (torch.bfloat16, None), (torch.float16, None)):
        x, score = torch.randn(320, 128).to(dtype), torch.randn(320, 128).to(dtype)
        for splits in (None, 2):
            kernels.svgd_step_forward(x, score, allow_tf32=allow_tf32, algorithm="tiled", splits=splits)
    with open(path, "w") as f:
        json.dump(list(launches.values()), f)


def register_use(ptx: str) -> dict:
    """Registers per thread and bytes of register spill stores, from ptxas -v (Triton's bundled ptxas)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([getattr(ptxas, "path", ptxas), "-arch=sm_90a", "-v", src, "-o", f"{tmp}/kernel.cubin"],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": int(spills.group(1)) if spills else None}


def compile_all(path: str) -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    importlib.import_module("bmt_fast.triton_backend").TRITON._load()  # imports bmt_fast.kernels
    utils = importlib.import_module("bmt_fast.kernels.utils")
    pointer = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16", "float16": "*fp16",
               "int32": "*i32", "int64": "*i64", "uint8": "*u8"}  # fmt: skip
    tl_types = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16,
                "int32": tl.int32, "int64": tl.int64, "uint32": tl.uint32, "uint64": tl.uint64}  # fmt: skip
    target = GPUTarget("cuda", 90, 32)
    results = []
    for entry in json.load(open(path)):
        module = importlib.import_module("bmt_fast.kernels." + entry["module"].rsplit(".", 1)[-1])
        fn = getattr(module, entry["name"])
        signature, constexprs, attrs = {}, {}, {}
        for name, spec in entry["params"].items():
            if spec.get("aligned"):
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
            if "ptr" in spec:
                signature[name] = pointer[spec["ptr"]]
            elif "int" in spec:
                signature[name] = "i32" if abs(spec["int"]) < 2**31 else "i64"
            else:
                value = spec["const"]
                constexprs[name] = tl_types.get(value, value) if isinstance(value, str) else value
                signature[name] = "constexpr"
        if entry["name"] == "_rank_select_kernel":  # the interpreter runs it with larger blocks than a GPU
            constexprs.update(module.RANK_BLOCKS_GPU)
        # The interpreter launches every kernel with the fixed tile, which is also the autotuner's first GPU
        # candidate: it must compile and fit on the GPU. The kernels of few rows (the Gram path's two, and
        # rbf_kernel's gradient) also try utils.SMALL_TILES (a prompt's particles without padding rows):
        # each of those is compiled too.
        tile = utils.FIXED_TILE
        assert tile == utils.GPU_TILES[0]
        tiles = [(tile, False)]
        if entry["name"] in ("_gram_kernel", "_rbf_kernel_grad_kernel") or (
            entry["name"] == "_svgd_step_kernel" and constexprs.get("DIST_GIVEN")
        ):
            tiles += [(t, True) for t in utils.SMALL_TILES]
        for tile, candidate in tiles:
            consts = {**constexprs, **tile.meta()} if candidate else constexprs
            row = {"kernel": entry["name"], "consts": {k: str(v) for k, v in consts.items()}, "candidate": candidate}
            try:
                source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
                compiled = triton.compile(source, target=target,
                                          options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})  # fmt: skip
                row["shared"] = compiled.metadata.shared
                row["wgmma"] = "wgmma.mma_async" in compiled.asm["ptx"]  # Hopper's warpgroup tensor-core MMA
                if entry["name"] in REGISTER_CHECKED:
                    row.update(register_use(compiled.asm["ptx"]))
            except Exception as exc:  # noqa: BLE001 - reported to the test
                row["error"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
            results.append(row)
    json.dump({"shared_limit": SHARED_LIMIT_SM90, "results": results}, sys.stdout)


if __name__ == "__main__":
    {"record": record, "compile": compile_all}[sys.argv[1]](sys.argv[2])
