"""Compile every Triton kernel variant for real GPUs on any machine, and read what the hardware would run.

Each variant is compiled as the JIT would specialize it at run time (pointers, strides, widths and the
vocabulary marked divisible by 16 where their values are), for sm_80 and sm_90. Per variant it reports
registers, spilled bytes, blocks per SM (from registers, warps and shared memory), and for the kernel's
main loop (or whole body, for a kernel without a loop) its SASS instruction count (all, and "hot": less
the block-uniform branches that are rarely taken, such as the argmax update) and its global loads by
width (128 bits when vectorized). The
registers come from ``cuobjdump -res-usage`` and the SASS from ``cuobjdump -sass``; both tools ship with
Triton.

Run it by hand for a table (``python tests/compile_kernels.py``, ``--only NAME_SUBSTRING``) or through
``test_compile.py``. It must run in a process without ``TRITON_INTERPRET`` (the interpreter replaces the
kernels with Python functions that ``triton.compile`` cannot take), hence a script rather than test code.
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

from lit_distill.kernels import sparse_triton as st
from lit_distill.kernels import triton_backend as tb
from lit_distill.kernels.options import DIVERGENCE_CODES

ARCHS = (80, 90)
# Per SM on both archs: 64K registers, 64 warps, 32 blocks; shared memory differs.
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
# Pointer element types by argument role; the logits' (and gradients') dtype is the variant's.
INDEX_POINTERS = {"argmax_ptr", "hard_ptr", "label_ptr", "target_ptr", "ids_ptr"}
INT32_POINTERS = {"sorted_ptr"}
FP32_POINTERS = {"stats_ptr", "scale_ptr", "coef_ptr", "slot_ptr"}
I64_SCALARS = {"s_stride", "t_stride", "grad_s_stride", "grad_t_stride", "grad_stride"}
FLOAT_SCALARS = {"inv_t", "mix", "soft_coef", "hard_coef", "teacher_coef", "label_mix"}
KERNELS = {"row_stats": tb._row_stats_kernel, "soft_pass": tb._soft_pass_kernel, "grad": tb._grad_kernel}
KERNELS.update({"sparse_stats": st._tail_stats_kernel, "sparse_grad": st._tail_grad_kernel})
#: The fused-linear forms' chunk logits are fp32 (``linear_plan.project``); their gradients the matmul's dtype.
FP32_LOGITS = {"s_ptr": "fp32", "t_ptr": "fp32"}
#: The sparse kernels' K (slots per token), padded to a power of two as the launcher pads it.
SPARSE_SLOTS = 64
#: The benchmark shape: N=8192 rows of a Llama-3 vocabulary, heads exactly as wide as the vocabulary.
LLAMA = {"vocab": 128256, "width": 128256, "n_rows": 8192}
#: GPT-2's 50257 tokens on a head padded to 50304 columns: the vocabulary is odd, the widths are not.
GPT2 = {"vocab": 50257, "width": 50304, "n_rows": 8192}


def runtime_values(shape: dict) -> dict[str, int]:
    """The integer arguments' values at run time for contiguous ``[n_rows, width]`` logits and gradients."""
    width = shape["width"]
    values = {name: width for name in ("s_stride", "t_stride", "grad_s_stride", "grad_t_stride", "grad_stride")}
    values["span"] = st.launch_config(shape["vocab"], shape["n_rows"])["span"]
    return {**values, "s_width": width, "t_width": width, "n_rows": shape["n_rows"], "vocab": shape["vocab"]}


def signature(kernel, dtype: str, constexprs: dict, pointers: dict | None = None) -> dict[str, str]:
    """The JIT's signature: ``pointers`` overrides the element type of named pointers (fp32 logits in the
    fused-linear forms, whose gradient is written in the variant's dtype)."""
    sig = {}
    for name in kernel.arg_names:
        if name in (pointers or {}):
            sig[name] = f"*{pointers[name]}"
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX_POINTERS:
            sig[name] = "*i64"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
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


def specialization(kernel, shape: dict) -> dict:
    """The JIT's divisibility attributes: every pointer (torch allocations are 16-byte aligned) and every
    integer whose run-time value is a multiple of 16."""
    values = runtime_values(shape)
    divisible = [i for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr") or values.get(name, 1) % 16 == 0]
    return {(i,): [["tt.divisibility", 16]] for i in divisible}


def _variant(kernel, name, dtype, warps, constexprs, shape, registers=None, pointers=None) -> dict:
    options = {} if registers is None else {"maxnreg": registers}
    return {"kernel": kernel, "name": name, "dtype": dtype, "warps": warps, "constexprs": constexprs, "shape": shape,
            "options": options, "pointers": pointers}  # fmt: skip


def variants() -> list[dict]:
    """Every divergence in bf16 (the training dtype), forward KL also in fp16 and fp32, at the Llama shape;
    forward KL in bf16 also at GPT-2's odd vocabulary."""
    out = []
    for shape_name, shape in (("", LLAMA), ("-odd_vocab", GPT2)):
        cfg = tb.launch_config(shape["vocab"])
        for div, code in DIVERGENCE_CODES.items():
            if shape is GPT2 and div != "forward_kl":
                continue
            dtypes = ["bf16", "fp16", "fp32"] if div == "forward_kl" and shape is LLAMA else ["bf16"]
            for dtype in dtypes:
                # T = 1 (one pair of sums), and T != 1 with both cross-entropies (the most live registers).
                for same_t in (True, False):
                    flags = {"SAME_T": same_t, "STUDENT_T1": not same_t, "TEACHER_T1": not same_t}
                    out.append(
                        _variant(
                            "row_stats",
                            f"row_stats-{div}-{dtype}-{'T1' if same_t else 'T2'}{shape_name}",
                            dtype,
                            cfg["row_warps"],
                            {"DIVERGENCE": code, **flags, "BLOCK": cfg["row_block"]},
                            shape,
                            cfg["row_registers"],
                        )
                    )
                if div not in tb.ONLINE_DIVERGENCES:  # the second forward pass
                    out.append(
                        _variant(
                            "soft_pass",
                            f"soft_pass-{div}-{dtype}{shape_name}",
                            dtype,
                            cfg["soft_warps"],
                            {"DIVERGENCE": code, "BLOCK": cfg["soft_block"]},
                            shape,
                        )
                    )
                # The plain student-only gradient, and every option on (the most live registers), the hard
                # term's label_weight mix (a second one-hot target) included.
                for same_t, hard, teacher in ((True, False, False), (False, True, True)):
                    flags = {"SAME_T": same_t, "STUDENT_GRAD": True, "SOFT": True, "HARD": hard, "LABEL_MIX": hard}
                    out.append(
                        _variant(
                            "grad",
                            f"grad-{div}-{dtype}-{'plain' if not hard else 'all_options'}{shape_name}",
                            dtype,
                            cfg["grad_warps"],
                            {"DIVERGENCE": code, **flags, "TEACHER_GRAD": teacher, "BLOCK": cfg["grad_block"]},
                            shape,
                        )
                    )
    # The fused-linear form's gradient pass: fp32 chunk logits in, the gradient out in the matmul's bf16.
    cfg = tb.launch_config(LLAMA["vocab"])
    for same_t, hard in ((True, False), (False, True)):
        flags = {"SAME_T": same_t, "STUDENT_GRAD": True, "SOFT": True, "HARD": hard, "LABEL_MIX": hard}
        constexprs = {"DIVERGENCE": DIVERGENCE_CODES["forward_kl"], **flags, "TEACHER_GRAD": hard}
        name = f"grad-forward_kl-bf16-{'all_options' if hard else 'plain'}-fp32_logits"
        constexprs["BLOCK"] = cfg["grad_block"]
        out.append(_variant("grad", name, "bf16", cfg["grad_warps"], constexprs, LLAMA, pointers=FP32_LOGITS))
    return [{**v, "arch": arch} for v in out + sparse_variants() for arch in ARCHS]


def sparse_variants() -> list[dict]:
    """The sparse-teacher kernels at K=64: bf16, fp16 and fp32 at the Llama shape, bf16 at GPT-2's odd
    vocabulary; the statistics pass with and without the T=1 sums, the gradient plain and with every option."""
    out = []
    for shape_name, shape, dtypes in (("", LLAMA, ("bf16", "fp16", "fp32")), ("-odd_vocab", GPT2, ("bf16",))):
        cfg = st.launch_config(shape["vocab"], shape["n_rows"])
        for dtype in dtypes:
            for t1 in (False, True):
                constexprs = {"K_PAD": SPARSE_SLOTS, "T1": t1, "BLOCK": cfg["row_block"]}
                name = f"sparse_stats-{dtype}-{'T2' if t1 else 'T1'}{shape_name}"
                registers = cfg["row_registers"]
                out.append(_variant("sparse_stats", name, dtype, cfg["row_warps"], constexprs, shape, registers))
            for same_t, hard in ((True, False), (False, True)):
                constexprs = {"K_PAD": SPARSE_SLOTS, "SAME_T": same_t, "HARD": hard, "BLOCK": cfg["grad_block"]}
                name = f"sparse_grad-{dtype}-{'all_options' if hard else 'plain'}{shape_name}"
                out.append(_variant("sparse_grad", name, dtype, cfg["grad_warps"], constexprs, shape))
                if dtype == "bf16" and shape is LLAMA:  # the fused-linear form: fp32 logits, bf16 gradient
                    fused = _variant("sparse_grad", f"{name}-fp32_logits", dtype, cfg["grad_warps"], constexprs, shape)
                    out.append({**fused, "pointers": FP32_LOGITS})
    return out


def cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("cuobjdump")


def blocks_per_sm(registers: int, warps: int, shared: int, arch: int) -> int:
    """Resident blocks per SM: registers are allocated per warp in units of 256, shared memory per block
    with 1 KiB reserved by the driver."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps)
    by_shared = SHARED_PER_SM[arch] // (shared + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(sass: str) -> dict:
    """SASS figures of the kernel's largest loop (a backward branch's span), or of the whole loop-free kernel.

    ``instructions`` counts every instruction in the span; ``hot`` leaves out those that a conditional
    forward branch inside the span can skip (the rarely taken block-uniform branches); ``loads`` counts the
    global loads in the span by width in bits (a vectorized load of logits is 128 bits).
    """
    code = [(int(a, 16), op, args) for a, _, op, args in SASS_LINE.findall(sass)]
    loops = []
    for addr, op, args in code:
        target = re.search(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    # A kernel without a loop (the gradient pass) is its own body.
    first, last = max(loops, key=lambda span: span[1] - span[0]) if loops else (code[0][0], code[-1][0])
    body = [(addr, op, args) for addr, op, args in code if first <= addr <= last]
    skippable = set()
    for addr, op, args in body:
        target = re.search(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and addr < int(target.group(1), 16) <= last:
            skippable.update(a for a, _, _ in body if addr < a < int(target.group(1), 16))
    loads = {}
    for _, op, _ in body:
        if op.startswith("LDG"):
            bits = int(m.group(1)) if (m := re.search(r"\.(128|64)\b", op)) else _scalar_bits(op)
            loads[bits] = loads.get(bits, 0) + 1
    return {"instructions": len(body), "hot": len(body) - len(skippable), "loads": loads}


def _scalar_bits(op: str) -> int:
    return 16 if re.search(r"\.(U16|S16)\b", op) else 8 if re.search(r"\.(U8|S8)\b", op) else 32


def compile_one(variant: dict) -> dict:
    kernel = KERNELS[variant["kernel"]]
    src = ASTSource(
        fn=kernel,
        signature=signature(kernel, variant["dtype"], variant["constexprs"], variant.get("pointers")),
        constexprs=variant["constexprs"],
        attrs=specialization(kernel, variant["shape"]),
    )
    options = {"num_warps": variant["warps"], **variant["options"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", variant["arch"], 32), options=options)
    result = {
        **variant,
        "ptx_bytes": len(compiled.asm["ptx"]),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
        "registers": None,
        "local_bytes": None,
        "blocks_per_sm": None,
        "loop": None,
    }
    tool = cuobjdump()
    if tool is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        result["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
        result["local_bytes"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))
        result["blocks_per_sm"] = blocks_per_sm(
            result["registers"], variant["warps"], result["shared_bytes"], variant["arch"]
        )
        result["loop"] = main_loop(sass)
    return result


def compile_all(selected: list[dict], workers: int = 2) -> list[dict]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, selected))


def _loads(loads: dict | None) -> str:
    return "-" if loads is None else " ".join(f"{bits}:{count}" for bits, count in sorted(loads.items(), reverse=True))


def _table(results: list[dict]) -> str:
    header = f"{'variant':44} {'arch':>6} {'regs':>5} {'spill':>6} {'blk/SM':>6} {'loop':>5} {'hot':>5}"
    lines = [f"{header} {'loads (bits: count)':>20}"]
    for r in results:
        loop = r["loop"] or {}
        lines.append(
            f"{r['name']:44} sm_{r['arch']:<3} {r['registers']!s:>5} {r['local_bytes']!s:>6} {r['blocks_per_sm']!s:>6}"
            f" {loop.get('instructions')!s:>5} {loop.get('hot')!s:>5} {_loads(loop.get('loads')):>20}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    chosen = variants()
    if "--only" in sys.argv:
        pattern = sys.argv[sys.argv.index("--only") + 1]
        chosen = [v for v in chosen if pattern in f"{v['name']}-sm_{v['arch']}"]
    results = compile_all(chosen, workers=int(os.environ.get("COMPILE_WORKERS", os.cpu_count() or 1)))
    print(json.dumps(results) if "--json" in sys.argv else _table(results))
