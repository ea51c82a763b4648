#!/usr/bin/env python3
"""`dsv4 info` of a checkpoint and of a preset: the configuration, the weights' size (the same for the preset and
its written checkpoint), a rank's share with --dp, the memory free here; neither or both sources is an error.
usage: check_info.py DSV4_BINARY TMP_DIR"""
import re
import shutil
import subprocess

from check_common import fail, target_and_stem


def run(binary, args, expect_ok=True):
    r = subprocess.run([binary] + args, capture_output=True, text=True, timeout=300)
    if (r.returncode == 0) != expect_ok:
        fail("%s: exit %d\n%s%s" % (" ".join(args), r.returncode, r.stdout, r.stderr[-2000:]))
    return r


def weights_gb(text):
    m = re.search(r"^weights ([0-9.]+) GB$", text, re.M)
    if not m:
        fail("no weights line in:\n" + text)
    return float(m.group(1))


def main():
    binary, stem = target_and_stem("info")
    preset = run(binary, ["info", "--preset", "tiny", "--dp", "2"]).stdout
    for needle in ("preset tiny", "layers 4 (+1 MTP)", "free here: host ", "kv cache (CUDA, FP8 rows): ",
                   "kv cache (CPU, bf16 rows): "):
        if needle not in preset:
            fail("info --preset tiny lacks %r:\n%s" % (needle, preset))
    share = re.search(r"split over 2 ranks: up to ([0-9.]+) GB", preset)
    if not share or not 0 < float(share.group(1)) < weights_gb(preset):
        fail("info --preset tiny --dp 2: no rank share below the whole:\n" + preset)
    run(binary, ["make-checkpoint", "--preset", "tiny", "--seed", "0", "--out", stem])
    ckpt = run(binary, ["info", "--model", stem]).stdout
    if "checkpoint %s: OK" % stem not in ckpt:
        fail("info --model: not OK:\n" + ckpt)
    kv = re.compile(r"^kv cache .*$", re.M)
    if kv.findall(ckpt) != kv.findall(preset) or len(kv.findall(preset)) != 2:
        fail("the checkpoint's kv cache lines differ from the preset's:\n%s\n%s" % (ckpt, preset))
    if weights_gb(ckpt) != weights_gb(preset):
        fail("the checkpoint's weights %s GB, the preset's %s GB" % (weights_gb(ckpt), weights_gb(preset)))
    shutil.rmtree(stem)
    for args in (["info"], ["info", "--preset", "tiny", "--model", "x"]):
        err = run(binary, args, expect_ok=False).stderr
        if "--model DIR or --preset NAME" not in err:
            fail("%s: the error does not name both options:\n%s" % (" ".join(args), err))
    print(preset + ckpt + "PASS")


if __name__ == "__main__":
    main()
