"""bench.py on the CPU: the scan table at a tiny size, and a clear exit where a GPU is needed."""

import pytest
import torch

import bench


def test_scan_table_on_the_cpu(capsys):
    bench.main(["scan", "--batch", "1", "--dim", "4", "--length", "33", "--state", "4", "--repeats", "1",
                "--dtype", "fp32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| parallel")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert cells[2] == "(1, 4, 33, 4)"
    assert float(cells[3]) > 0 and float(cells[4]) > 0     # forward, forward + backward ms
    assert float(cells[6]) < 1e-6                          # y against the sequential definition


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
def test_model_bench_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="bench.py model times DiM against attention on a GPU"):
        bench.main(["model"])
