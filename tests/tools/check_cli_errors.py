#!/usr/bin/env python3
"""Bad outputs and models that do not fit fail before the long work, naming the option or the sizes:
`bench decode --json` and `generate --dump-logits` into a missing folder or onto a folder, positions beyond the
model's, a KV cache beyond the host's free memory, a checkpoint beyond the free disk space (v4-pro, where the disk
has less than 900 GB free), and (where this host's free memory is below it) bench-1g's 34 GB of weights drawn on the
CPU.
usage: check_cli_errors.py DSV4_BINARY TMP_DIR"""
import os
import re
import shutil
import subprocess
import time

from check_common import fail, target_and_stem


def expect_fast_failure(binary, args, *needles, limit_s=60, after_load=False):
    """after_load: the check runs once the weights are loaded (the table's header may be out, no result line)."""
    start = time.monotonic()
    try:
        run = subprocess.run([binary] + args, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        fail("%s: still running after %d s; expected an error before any work" % (" ".join(args), limit_s))
    took = time.monotonic() - start
    if run.returncode == 0:
        fail("%s: exit 0, expected an error" % " ".join(args))
    for needle in needles:
        if needle not in run.stderr:
            fail("%s: stderr lacks %r:\n%s" % (" ".join(args), needle, run.stderr[-2000:]))
    ran = re.search(r"^\d+\s+\d", run.stdout, re.M) if after_load else "stage ms" in run.stdout
    if ran:
        fail("%s: the benchmark ran before the error:\n%s" % (" ".join(args), run.stdout))
    print("ok (%.1f s): %s -> %s" % (took, " ".join(args), run.stderr.strip().splitlines()[-1]))


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                m = re.match(r"MemAvailable:\s+(\d+) kB", line)
                if m:
                    return int(m.group(1)) * 1024
    except OSError:
        pass
    return None


def main():
    binary, stem = target_and_stem("cli_errors")
    missing = os.path.join(stem + "_missing", "out.json")
    os.makedirs(stem + "_dir", exist_ok=True)
    tiny = ["--backend", "cpu", "--preset", "tiny", "--random-weights", "1", "--batch", "1", "--replays", "1",
            "--warmup", "0"]
    expect_fast_failure(binary, ["bench", "decode"] + tiny + ["--json", missing], "--json", "does not exist")
    expect_fast_failure(binary, ["bench", "decode"] + tiny + ["--json", stem + "_dir"], "--json", "is a directory")
    expect_fast_failure(binary, ["generate", "--backend", "cpu", "--preset", "tiny", "--prompt-ids", "1,2",
                                 "--max-new-tokens", "1", "--dump-logits", missing], "--dump-logits",
                        "does not exist")
    # Positions beyond the model's (tiny: max_position_embeddings 1024), before any weight is drawn.
    expect_fast_failure(binary, ["bench", "decode"] + tiny + ["--context", "1024"], "--context 1024",
                        "max_position_embeddings 1024")
    expect_fast_failure(binary, ["generate", "--backend", "cpu", "--preset", "tiny", "--prompt-ids", "1,2",
                                 "--max-new-tokens", "1023"], "--max-new-tokens is 1025 tokens",
                        "max_position_embeddings 1024")
    # A checkpoint larger than the free disk space (v4-pro: 865 GB), before anything is written.
    if shutil.disk_usage(os.path.dirname(stem)).free < 900e9:
        expect_fast_failure(binary, ["make-checkpoint", "--preset", "v4-pro", "--out", stem + "_pro"],
                            "its tensors take 864.70 GB", "GB are free there", "--out")
        if os.path.exists(stem + "_pro"):
            fail("make-checkpoint created %s before failing" % (stem + "_pro"))
    # A KV cache larger than any host's free memory (4.8 TB): an error before any of it is allocated.
    expect_fast_failure(binary, ["bench", "decode", "--backend", "cpu", "--preset", "tiny", "--batch", "10000000",
                                 "--context", "1000"], "the KV cache", "GB are free on the host", "--batch, --context",
                        after_load=True)
    # serve --kv-cache-memory auto whose reserve leaves nothing: an error before the server starts; the reserve
    # needs auto; auto needs one device a rank.
    serve = ["serve", "--backend", "cpu", "--preset", "tiny", "--port", "0"]
    expect_fast_failure(binary, serve + ["--kv-cache-memory", "auto", "--kv-cache-reserve", "100000G"],
                        "--kv-cache-memory auto: ", "room for 0 pages", "--kv-cache-reserve", after_load=True)
    expect_fast_failure(binary, serve + ["--kv-cache-memory", "4G", "--kv-cache-reserve", "1G"],
                        "--kv-cache-reserve takes a size, with --kv-cache-memory auto")
    expect_fast_failure(binary, serve + ["--kv-cache-memory", "auto", "--dp", "2"],
                        "in-process CPU ranks share the host's")
    if os.path.exists(missing) or os.path.isdir(os.path.dirname(missing)):
        fail("a check created %s" % missing)
    # bench-1g's weights (34.3 GB with the MTP block) drawn in host memory: an error at once where they do not fit.
    available = mem_available()
    if available is None or available >= 34.0e9:
        print("skipped the host-memory case: MemAvailable %s" % available)
    else:
        expect_fast_failure(binary, ["bench", "decode", "--backend", "cpu", "--preset", "bench-1g", "--batch", "1"],
                            "preset bench-1g", "GB of host memory", "GB are free", "--backend cuda")
    os.rmdir(stem + "_dir")
    print("PASS")


if __name__ == "__main__":
    main()
