"""What the experiment scripts share: metrics to JSONL and TensorBoard, and an absl entry
point whose `--help` exits 0.

    with MetricsLog("/tmp/run/metrics.jsonl") as log:        # TensorBoard under /tmp/run/tb
        log.write(dict(step=7, loss=0.5), step=7, tag="train")  # a JSON line; scalar train/loss

    if __name__ == "__main__":
        run(main)      # `--help` exits 0; a usage error is one line on stderr, exit 1

`tensorboard --logdir <dir>/tb` shows the scalars; a `run=` of `write` puts them in the
subfolder `<dir>/tb/<run>`, which TensorBoard draws as its own curve (one per model, say).
Scripts import this module as `script_io` (python puts `experiments/` first on the path
when one of them runs).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable


class MetricsLog:
    """A JSONL file (one record a line, flushed at once) plus TensorBoard scalars.

    jsonl_path: the JSONL file (its folder is made). tb_dir: TensorBoard folder (default
    `<folder of jsonl_path>/tb`). resume_from: None writes the JSONL afresh; a step
    continues a run: lines whose `step` is past it (work of a killed run after its last
    checkpoint) are dropped, new lines appended, and TensorBoard drops events past it.
    """

    def __init__(self, jsonl_path: str, tb_dir: str | None = None, *, resume_from: int | None = None):
        if resume_from is not None and (not isinstance(resume_from, int) or resume_from < 0):
            raise ValueError(f"resume_from must be None or an int >= 0, got {resume_from!r}")
        folder = os.path.dirname(os.path.abspath(jsonl_path))
        os.makedirs(folder, exist_ok=True)
        self.jsonl_path = jsonl_path
        self.tb_dir = os.path.join(folder, "tb") if tb_dir is None else tb_dir
        self.resume_from = resume_from
        if resume_from is not None:
            _truncate_jsonl(jsonl_path, resume_from)
        try:      # at the start, not at the first write after minutes of work
            from tensorboardX import SummaryWriter  # noqa: PLC0415
        except ImportError as e:
            raise ImportError("the experiment scripts log TensorBoard scalars through tensorboardX "
                              "(a dependency in pyproject.toml): pip install tensorboardX, or on a "
                              "machine without a registry carry its wheel") from e
        self._summary_writer = SummaryWriter
        self._file = open(jsonl_path, "w" if resume_from is None else "a")
        self._writers = {}

    def write(self, record: dict, *, step: int, tag: str = "", keys: Iterable[str] | None = None,
              run: str | None = None):
        """Appends `record` as one JSON line, and logs its numbers (int / float values) of
        the keys `keys` (default: all but `step`) as TensorBoard scalars `<tag>/<key>` at
        `step`, in the run `run` (None: `tb_dir` itself). Other values (None, strings,
        dicts) go to the JSONL only."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        writer = self._writer(run)
        for k in [k for k in record if k != "step"] if keys is None else keys:
            value = record[k]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{tag}/{k}" if tag else k, float(value), step)

    def _writer(self, run: str | None):
        if run not in self._writers:
            logdir = self.tb_dir if run is None else os.path.join(self.tb_dir, run)
            purge = None if self.resume_from is None else self.resume_from + 1
            self._writers[run] = self._summary_writer(logdir, purge_step=purge)
        return self._writers[run]

    def close(self):
        self._file.close()
        for writer in self._writers.values():
            writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_jsonl(path: str, last_step: int):
    """Keeps the lines of `path` whose `step` is <= `last_step` (a line cut by a kill goes)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    write_atomic(path, "".join(kept))


def write_atomic(path: str, text: str):
    """Writes `path` whole or not at all (a kill leaves the old file)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def replace_section(path: str, heading: str, section: str):
    """Put `section` (markdown that starts with the line `heading`, a `## ` title) into the
    file at `path`: in place of the section under `heading` (up to the next `## ` title), or
    appended where there is none; a missing file starts as `# Results`."""
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomic(path, text)


def run(main):
    """`absl.app.run(main)`, except that `--help` (`-h`, `--helpshort`; `--helpfull` for every
    module's flags) prints the module docstring and the script's own flags to stdout and exits
    0 (absl's own exits 1), and that an `app.UsageError` raised by `main` prints one short
    message to stderr and exits 1 (absl's prints the whole flag help before it)."""
    from absl import app
    asked = set(sys.argv[1:])
    if {"--help", "-h", "-?", "--helpshort", "--helpfull"} & asked:
        app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True, exitcode=0)

    def main_with_short_usage_errors(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            name = os.path.basename(sys.argv[0])
            print(f"{name}: error: {e}\n(`{name} --help` lists the flags)", file=sys.stderr)
            sys.exit(e.exitcode or 1)

    app.run(main_with_short_usage_errors)
