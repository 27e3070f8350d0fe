"""Compile every Triton kernel variant for real GPUs on any machine, and read registers and spills.

Run it by hand for a table (``python tests/compile_kernels.py``) or through ``test_compile.py``. It must
run in a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels with Python
functions that ``triton.compile`` cannot take), hence a script rather than test code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lit_distill.kernels import triton_backend as tb
from lit_distill.kernels.options import DIVERGENCE_CODES

ARCHS = (80, 90)
# Pointer element types by argument role; the logits' (and gradients') dtype is the variant's.
INDEX_POINTERS = {"argmax_ptr", "hard_ptr", "label_ptr"}
FP32_POINTERS = {"stats_ptr", "scale_ptr"}
I64_SCALARS = {"s_stride", "t_stride", "grad_s_stride", "grad_t_stride"}
FLOAT_SCALARS = {"inv_t", "mix", "soft_coef", "hard_coef", "teacher_coef"}
KERNELS = {"row_stats": tb._row_stats_kernel, "soft_pass": tb._soft_pass_kernel, "grad": tb._grad_kernel}


def signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX_POINTERS:
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in I64_SCALARS:
            sig[name] = "i64"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(vocab: int = 128256) -> list[dict]:
    """Every divergence in bf16 (the training dtype), forward KL also in fp16 and fp32; launch config of ``vocab``."""
    cfg = tb.launch_config(vocab)
    out = []
    for div, code in DIVERGENCE_CODES.items():
        for dtype in ["bf16", "fp16", "fp32"] if div == "forward_kl" else ["bf16"]:
            for same_t in (True, False):
                out.append(
                    {
                        "kernel": "row_stats",
                        "dtype": dtype,
                        "warps": cfg["row_warps"],
                        "constexprs": {"DIVERGENCE": code, "SAME_T": same_t, "BLOCK": cfg["row_block"]},
                        "name": f"row_stats-{div}-{dtype}-sameT{same_t}",
                    }
                )
            if div not in tb.ONLINE_DIVERGENCES:  # the second forward pass
                out.append(
                    {
                        "kernel": "soft_pass",
                        "dtype": dtype,
                        "warps": cfg["row_warps"],
                        "constexprs": {"DIVERGENCE": code, "BLOCK": cfg["row_block"]},
                        "name": f"soft_pass-{div}-{dtype}",
                    }
                )
            # The plain student-only gradient, and every option on (the most live registers).
            for same_t, hard, teacher in ((True, False, False), (False, True, True)):
                flags = {"SAME_T": same_t, "STUDENT_GRAD": True, "HARD": hard, "TEACHER_GRAD": teacher}
                out.append(
                    {
                        "kernel": "grad",
                        "dtype": dtype,
                        "warps": cfg["grad_warps"],
                        "constexprs": {"DIVERGENCE": code, **flags, "BLOCK": cfg["grad_block"]},
                        "name": f"grad-{div}-{dtype}-{'plain' if hard is False else 'all_options'}",
                    }
                )
    return [{**v, "arch": arch} for v in out for arch in ARCHS]


def cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("cuobjdump")


def compile_one(variant: dict) -> dict:
    kernel = KERNELS[variant["kernel"]]
    src = ASTSource(
        fn=kernel,
        signature=signature(kernel, variant["dtype"], variant["constexprs"]),
        constexprs=variant["constexprs"],
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", variant["arch"], 32), options={"num_warps": variant["warps"]}
    )
    result = {
        **variant,
        "ptx_bytes": len(compiled.asm["ptx"]),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "registers": None,
        "local_bytes": None,
    }
    tool = cuobjdump()
    if tool is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        result["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
        result["local_bytes"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return result


def compile_all(workers: int = 2) -> list[dict]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, variants()))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    results = compile_all(workers=int(os.environ.get("COMPILE_WORKERS", os.cpu_count() or 1)))
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        print(f"{'variant':48} {'arch':>5} {'regs':>5} {'local':>6}")
        for r in results:
            print(f"{r['name']:48} sm_{r['arch']:<3} {r['registers']!s:>5} {r['local_bytes']!s:>6}")
