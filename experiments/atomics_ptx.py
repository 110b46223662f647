"""The sparse-MLA backward's atomics in PTX for sm_90, without a GPU: are they vectorized?

Two stages, each in its own interpreter (the project venv has no `triton`; pip `triton`
has no jax):

  dump: lower `token_sparse_backward` at DSA's shape (64 query heads on one latent kv head,
        keys 576 = 512 + 64, values their first 512, bf16, k = --top_k listed slots, --t
        tokens) for an abstract H100 on the CPU (tests/gpu_testing.lower_for_cuda) and
        write each Triton kernel's IR (TTIR, text; gpu_testing.triton_kernels) to
        `--out/<kernel>.ttir`, with its launch parameters in `--out/<kernel>.json`.
  ptx:  compile every `--out/*.ttir` with pip `triton` for sm_90 (`GPUTarget("cuda", 90,
        32)`, the kernel's num_warps / num_stages; ptxas is bundled, no GPU needed), write
        `<kernel>[.ptxNN].ptx` / `.ttgir`, and count the global atomic and reduction
        instructions (`red.global...add.f32` scalar vs `.v2` / `.v4`).

Vectorized float atomics (`red.global.add.v4.f32`) need sm_90, PTX ISA >= 8.1 (Triton
PR #4982: below it the lowering keeps them scalar) and pointers that Triton's axis
analysis proves contiguous and 16-byte aligned. `--ptx_version 80` shows the PTX 8.0
form; XLA compiles Pallas' Triton kernels with its own pipeline
(xla/backends/gpu/codegen/triton/compilation_pipeline_cuda.cc), which must pass a PTX
version >= 81 to `createConvertTritonGPUToLLVMPass` for the vector form.

  PYTHONPATH=. python experiments/atomics_ptx.py --stage dump --out /tmp/atomics_ptx
  python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton absl-py
  TRITON_DEFAULT_FP_FUSION=1 /tmp/tvenv/bin/python experiments/atomics_ptx.py --stage ptx --out /tmp/atomics_ptx
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # repo root

from absl import flags

import script_io

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", None, ["dump", "ptx"], "dump: TTIR from the project venv; ptx: PTX from pip triton")
flags.DEFINE_string("out", "/tmp/atomics_ptx", "folder of the .ttir / .json / .ptx files")
flags.DEFINE_integer("t", 256, "dump: query tokens (the kernels do not depend on it beyond sizes)")
flags.DEFINE_integer("top_k", 2048, "dump: listed slots per query")
flags.DEFINE_bool("fold", True, "dump: value_is_key_prefix (dv folded into dk's first 512 columns)")
flags.DEFINE_integer("ptx_version", 0, "ptx: PTX ISA version as 10 * major + minor (0: triton's default)")


def dump(out: str, t: int, top_k: int, fold: bool) -> list[str]:
    """Writes each Triton kernel of the DSA-shaped backward to `out/<name>.ttir` (+ `.json`)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    from pallas_kernels.token_sparse import api  # noqa: PLC0415

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from gpu_testing import lower_for_cuda, triton_kernels  # noqa: PLC0415

    h, spec = 64, jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    args = (spec((1, t, h, 576), bf), spec((1, t, 1, 576), bf), spec((1, t, 1, 512), bf),
            spec((1, t, 1, top_k), i32), spec((1, t, h, 512), bf), spec((1, h, t), f32),
            spec((1, t, h, 512), bf), spec((1, h, t), f32), spec((1, t), i32))

    def bwd(q, k, v, idx, o, lse, do, dlse, pos):
        return api.token_sparse_backward(q, k, v, idx, o, lse, do, dlse, q_positions=pos, kv_positions=pos,
                                         scale=576 ** -0.5, value_is_key_prefix=fold)

    def kernel(cfg, module):
        launch = {key: ir.IntegerAttr(cfg[key]).value for key in ("num_warps", "num_stages", "num_ctas")
                  if key in cfg}
        return ir.StringAttr(cfg["name"]).value, launch, module.operation.get_asm(enable_debug_info=False)

    os.makedirs(out, exist_ok=True)
    written = []
    for name, launch, text in triton_kernels(lower_for_cuda(bwd, *args), kernel):
        path = os.path.join(out, f"{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(launch, f)
        print(f"{path}: {launch}, {text.count('tt.atomic_rmw')} tt.atomic_rmw")
        written.append(path)
    return written


def ptx(out: str, ptx_version: int) -> dict:
    """Compiles `out/*.ttir` for sm_90 with pip triton; {kernel: {instruction: count}}."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*.ttir"))):
        base = path[:-len(".ttir")]
        launch = json.load(open(base + ".json")) if os.path.exists(base + ".json") else {}
        opts = {"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 3)}
        if ptx_version:
            opts["ptx_version"] = ptx_version
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=opts)
        text = kernel.asm["ptx"]
        tag = f".ptx{ptx_version}" if ptx_version else ""
        for ext in ("ptx", "ttgir"):
            with open(f"{base}{tag}.{ext}", "w") as f:
                f.write(kernel.asm[ext])
        counts = collections.Counter(re.findall(r"\b((?:red|atom)\.global\.[a-z0-9.]+)", text))
        version = re.search(r"\.version (\S+)", text).group(1)
        print(f"{os.path.basename(base)} (sm_90, PTX {version}, {opts}):")
        for op, n in sorted(counts.items()):
            print(f"  {n:6d} x {op}")
        found[os.path.basename(base)] = dict(counts)
    return found


def main(argv):
    from absl import app  # noqa: PLC0415
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.stage is None:
        raise app.UsageError("--stage dump (project venv) or --stage ptx (a venv with pip triton)")
    if FLAGS.stage == "dump":
        dump(FLAGS.out, FLAGS.t, FLAGS.top_k, FLAGS.fold)
    else:
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            raise app.UsageError("--stage ptx needs pip `triton` (a separate venv: see --help)") from None
        ptx(FLAGS.out, FLAGS.ptx_version)


if __name__ == "__main__":
    script_io.run(main)
