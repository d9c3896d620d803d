"""Runs the README's two-rank torchrun training many times in a row and reports every failure.

    python tests/torchrun_soak.py --runs 50          # about 15 s a run on a 2-core CPU

Not part of the pytest suite (it takes minutes): a check for rare failures at start-up or teardown,
such as a rank aborting at exit, which one run in twenty cannot show.
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--port", type=int, default=29541)
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    failures = 0
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as results:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={args.port}",
                       os.path.join(ROOT, "train.py"), "--max-steps", str(args.max_steps), "--global-batch-size", "8",
                       "--results-dir", results]
            result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            ok = result.returncode == 0 and "weights identical on all 2 ranks: True" in result.stdout + result.stderr
        failures += not ok
        print(f"run {i + 1:3d}: {'ok' if ok else 'FAILED, exit status ' + str(result.returncode)}", flush=True)
        if not ok:  # what the ranks said before torchrun's own report (a C++ abort's message is there)
            print(result.stderr.split("Traceback (most recent call last)")[0][-3000:], flush=True)
    print(f"{args.runs - failures} passed, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
