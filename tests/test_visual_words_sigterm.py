"""SIGTERM (``scancel``, a SLURM time limit, ``kill``) stops ``dira3d visual-words`` as Ctrl-C does.

It ended the command at once without a word (exit -15): the volumes embedded since the last chunk were lost (up to
a minute of the embedding) and nothing said what was kept. Now the rows embedded so far are written as a chunk, one
line says what is kept and how to go on, and the exit status is 143.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dira3d.visual_words.embedding_chunks import PARTIAL_NAME
from dira3d.visual_words.synthetic import write_template_datalist

# the command in a process of its own (a SIGTERM there must not reach pytest); SIGTERM while batch 2 is embedded
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from dira3d.visual_words import embedding_chunks
    from dira3d.visual_words.command import main

    original = embedding_chunks.iter_embeddings

    def stopped(*args, **kwargs):
        for batch, rows in enumerate(original(*args, **kwargs)):
            if batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the signal arrives here
                raise SystemExit("SIGTERM did not stop the command")
            yield rows

    embedding_chunks.iter_embeddings = stopped
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigterm_while_embedding_keeps_the_rows_says_so_and_exits_143(tmp_path):
    datalist = write_template_datalist(tmp_path / "data", templates=3, per_template=2, val_per_template=1,
                                       shape=(32, 32, 16))
    out = tmp_path / "vw"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--datalist", str(datalist), "--out", str(out), "--classes", "2",
         "--neighbours", "2", "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "4", "4", "2",
         "--extractor-size", "16", "16", "8", "--extractor-width", "0.125", "--extractor-epochs", "1",
         "--lung-filter", "off"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"dira3d visual-words: stopped by SIGTERM while embedding the volumes; the embeddings of the first "
                    f"4 are kept in {out / PARTIAL_NAME} (and the trained extractor in {out / 'extractor.pt'}): rerun "
                    "the same command to continue after them"), done.stderr[-3000:]
    assert sorted(p.name for p in (out / PARTIAL_NAME).glob("rows_*")) == ["rows_0000000-0000004.npy"]
