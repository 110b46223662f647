"""Print the buffers the compiled XLA Quest score program writes on this machine's GPU, at the
GPU test's shape (B 2, Hkv 8, 4096 pages, D 128) and at the bench's (B 16, 8192 pages), and
the instructions that write a bounds-sized one (test_quest's GPU assertion)."""
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "tests")
from test_quest import _largest_written_buffer  # noqa: E402
from sparse_jax.ops import quest as Q  # noqa: E402

for b, p in ((2, 4096), (16, 8192)):
    hkv, d = 8, 128
    kmin = jnp.zeros((b, hkv, p, d), jnp.bfloat16)
    args = (jnp.zeros((b, 1, 4 * hkv, d), jnp.bfloat16), kmin, kmin, jnp.ones((b, p), bool))
    largest, written = _largest_written_buffer(Q.quest_page_scores, *args)
    print(f"B{b} P{p}: largest written {largest} B, bounds {kmin.nbytes} B; written {written}")
    text = jax.jit(Q.quest_page_scores).lower(*args).compile().as_text()
    entry = text.split("\nENTRY ")[-1].split("\n}")[0]
    for line in entry.splitlines():
        if re.search(rf"\[{b * hkv},{p},{d}\]|\[{b},{hkv},{p},{d}\]", line) and "parameter(" not in line:
            print("   ", line.strip()[:400])
    for name in re.findall(r"calls=(%[\w.-]+)", entry)[:6]:
        body = text.split(f"\n{name} ")[-1].split("\n}")[0] if f"\n{name} " in text else ""
        if f"{p},{d}" in body:
            print("  fusion", name, body[:1500].replace("\n", "\n    "))
