#!/usr/bin/env python3
"""`dsv4 env` against the sources: every DSV4_* variable the C++ sources and the scripts read is in its table and
every name in the table is read somewhere; every `DSV4_X=VALUE` the README and docs/ARCHITECTURE.md mention names a
switch that exists and a value it takes; dsv4 warns about a misspelt name (naming the switch meant) and about a value
a switch does not take, and not about good ones.
usage: check_env_switches.py DSV4_BINARY TMP_DIR"""
import json
import os
import re
import subprocess

from check_common import fail, target_and_stem

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_env(binary, env_vars, args=("env", "--set", "--json")):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV4_")}
    env.update(env_vars)
    r = subprocess.run([binary] + list(args), capture_output=True, text=True, timeout=60, env=env)
    if r.returncode != 0:
        fail("dsv4 %s with %s: exit %d\n%s" % (" ".join(args), env_vars, r.returncode, r.stderr))
    return r


def files(folders, suffixes):
    for folder in folders:
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            for name in names:
                if name.endswith(suffixes):
                    yield os.path.join(root, name)


def names_read():
    """{name: a file that reads it}: C++ string literals, the scripts' $DSV4_X / os.environ reads, CMake's $ENV{DSV4_X}."""
    found = {}
    for path in files(["src", "tools", "tests"], (".cpp", ".cu", ".cuh", ".h")):
        for name in re.findall(r'"(DSV4_[A-Z0-9_]+)"', open(path, encoding="utf-8").read()):
            found.setdefault(name, path)
    for path in files(["scripts", ".ci"], (".sh", ".py", "run")):
        text = open(path, encoding="utf-8").read()
        for name in re.findall(r"\$\{?(DSV4_[A-Z0-9_]+)", text) + re.findall(
                r"environ[^\n]*?[\"'](DSV4_[A-Z0-9_]+)[\"']", text):
            found.setdefault(name, path)
    for path in files(["cmake", "src", "tools", "tests"], (".cmake", "CMakeLists.txt")):
        for name in re.findall(r"ENV\{(DSV4_[A-Z0-9_]+)\}", open(path, encoding="utf-8").read()):
            found.setdefault(name, path)
    return found


def call_args(text, start):
    """The top-level arguments of the call whose '(' is at text[start]."""
    depth, args, cur = 0, [], ""
    for ch in text[start:]:
        if ch == "(":
            depth += 1
            if depth == 1:
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return args + [cur.strip()]
        elif ch == "," and depth == 1:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return args


def integer_readers():
    """{name: (fallback, min, max)} of every env_integer call (and the mHC's row-limit wrapper), the constants
    they name resolved from the sources' constexpr definitions."""
    texts = {path: open(path, encoding="utf-8").read() for path in files(["src"], (".cu", ".cuh", ".h", ".cpp"))}
    consts = {}
    for text in texts.values():
        for name, value in re.findall(r"constexpr\s+(?:int|int64_t)\s+(k\w+)\s*=\s*([0-9]+);", text):
            consts[name] = int(value)

    def value(expr):
        expr = re.sub(r"int64_t\((\w+)\)", r"\1", expr)
        expr = re.sub(r"\bk\w+\b", lambda m: str(consts[m.group(0)]), expr)
        if not re.fullmatch(r"[0-9<> ()+-]+", expr):
            fail("cannot read the integer %r" % expr)
        return eval(expr)

    out = {}
    for text in texts.values():
        for m in re.finditer(r"\benv_integer\(\s*\"(DSV4_[A-Z0-9_]+)\"", text):
            fb, lo, hi = call_args(text, m.end() - len(m.group(0)) + len("env_integer"))[1:4]
            out[m.group(1)] = (value(fb), value(lo), value(hi))
        for m in re.finditer(r"\bhc_rows_from_env\(\s*\"(DSV4_[A-Z0-9_]+)\"", text):
            fb = call_args(text, m.end() - len(m.group(0)) + len("hc_rows_from_env"))[1]
            out[m.group(1)] = (value(fb), 0, consts["kHcPostMaxRows"])
    return out


def documented():
    """[(doc, name, value)] for every `DSV4_X=VALUE` of the README and ARCHITECTURE.md (not CMake's -DDSV4_X=)."""
    out = []
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        text = open(os.path.join(REPO, doc), encoding="utf-8").read()
        for name, value in re.findall(r"(?<![\w-])(DSV4_[A-Z0-9_]+)=([^\s`),;]*)", text):
            out.append((doc, name, value))
    return out


def main():
    binary, _ = target_and_stem("env")
    table = json.loads(run_env(binary, {}, ("env", "--json")).stdout)
    listed = {row["name"] for row in table}
    for row in table:
        for key in ("reader", "values", "unset", "what", "strict"):
            if key not in row:
                fail("dsv4 env --json: %s lacks %r" % (row["name"], key))

    read = names_read()
    for name, path in sorted(read.items()):
        if name not in listed:
            fail("%s reads %s, which tools/env_switches.cpp does not list" % (os.path.relpath(path, REPO), name))
    for name in sorted(listed - set(read)):
        fail("tools/env_switches.cpp lists %s, which nothing in src, tools, tests or scripts reads" % name)

    # The integer switches: the table's range and unset value are the reader's.
    readers = integer_readers()
    if len(readers) < 8:
        fail("only %d env_integer readers found: the pattern no longer matches them" % len(readers))
    rows = {row["name"]: row for row in table}
    for name, (fallback, lo, hi) in sorted(readers.items()):
        if "%d..%d" % (lo, hi) not in rows[name]["values"] or not rows[name]["unset"].startswith(str(fallback)):
            fail("%s: the reader takes %d..%d and reads unset as %d; the table says %r, unset %r" %
                 (name, lo, hi, fallback, rows[name]["values"], rows[name]["unset"]))

    # The word switches: each value a reader compares with is one the table lists.
    for path in files(["src"], (".cu", ".cuh", ".h", ".cpp")):
        text = open(path, encoding="utf-8").read()
        compared = re.findall(r'env_is\("(DSV4_[A-Z0-9_]+)",\s*"([^"]*)"\)', text) + [
            (name, v) for name in re.findall(r'env_mode\("(DSV4_[A-Z0-9_]+)"\)', text) for v in ("0", "1")]
        for name, v in compared:
            if v not in rows[name]["values"].split(" | "):
                fail("%s compares %s with %r, which the table does not list (%r)" %
                     (os.path.relpath(path, REPO), name, v, rows[name]["values"]))

    docs = documented()
    if len(docs) < 20:
        fail("only %d DSV4_X= mentions found in the docs: the pattern no longer matches them" % len(docs))
    values = {}  # name -> the values the docs give it
    for doc, name, value in docs:
        if name not in listed:
            fail("%s mentions %s=%s, a variable nothing reads" % (doc, name, value))
        # "0/1", "1|4", "256|1024": each a value the switch takes; placeholders (N, PREFIX, A-B) are not values.
        for v in re.split(r"[|/]", value):
            if v and not re.fullmatch(r"[A-Z][A-Z-]*", v) and not v.endswith("...") and v not in values.get(name, []):
                values.setdefault(name, []).append(v)
    # The i-th value of every switch in one run (a process start is ~0.4 s).
    for i in range(max(len(v) for v in values.values())):
        env_vars = {name: v[i] for name, v in values.items() if i < len(v)}
        warned = run_env(binary, env_vars).stderr
        if "warning" in warned:
            fail("the docs give values dsv4 does not take:\n%s" % warned)

    # Good values: no warning; an empty value reads as unset.
    good = {"DSV4_CUDA_LANES": "2", "DSV4_CUDA_ATTN_PAIR": "4-16", "DSV4_CUDA_PDL_LANES": "fork",
            "DSV4_CUDA_PREP_ONE_LAUNCH_ROWS": "128", "DSV4_CUDA_TMA": "", "DSV4_TEST_TMP": "/somewhere"}
    r = run_env(binary, good)
    if r.stderr.strip():
        fail("warnings for good values %s:\n%s" % (good, r.stderr))
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    if set(rows) != set(good) or rows["DSV4_CUDA_LANES"].get("value") != "2":
        fail("dsv4 env --set --json with %s lists:\n%s" % (good, r.stdout))

    # A misspelt name names the switch meant; a bad value says what the switch takes and what it is read as.
    cases = [
        ({"DSV4_CUDA_WIDE_WSS": "0"}, "DSV4_CUDA_WIDE_WSS is not a variable dsv4 reads (did you mean DSV4_CUDA_WIDE_WS?)"),
        ({"DSV4_CUDA_TMA": "off"}, "DSV4_CUDA_TMA='off' is not a value it takes (0 | 1); the CUDA backend reads it as unset: 1"),
        ({"DSV4_CUDA_LANES": "5"}, "DSV4_CUDA_LANES='5' is not a value it takes (1 | 2 | 3); the CUDA backend stops"),
        ({"DSV4_CUDA_ATTN_PAIR": "16-4"}, "DSV4_CUDA_ATTN_PAIR='16-4' is not a value it takes"),
        ({"DSV4_CUDA_EXPERT_LAUNCHES": "9"}, "DSV4_CUDA_EXPERT_LAUNCHES='9' is not a value it takes (1..8)"),
        ({"DSV4_ZZZZZZZZ": "1"}, "DSV4_ZZZZZZZZ is not a variable dsv4 reads; `dsv4 env` lists them"),
    ]
    for env_vars, expected in cases:
        r = run_env(binary, env_vars)
        if "dsv4: warning: " + expected not in r.stderr:
            fail("with %s expected the warning %r, got:\n%s" % (env_vars, expected, r.stderr))
    unknown = json.loads(run_env(binary, {"DSV4_ZZZZZZZZ": "1"}).stdout)
    if unknown != [{"name": "DSV4_ZZZZZZZZ", "value": "1", "unknown": True}]:
        fail("dsv4 env --set --json lists an unknown name as %s" % unknown)

    # The plain listing: every switch, grouped by who reads it.
    text = run_env(binary, {}, ("env",)).stdout
    for needle in ("CUDA backend:", "DSV4_CUDA_WIDE_WS", "unset: 2", "tests:", "DSV4_TEST_SEED"):
        if needle not in text:
            fail("dsv4 env lacks %r:\n%s" % (needle, text[:3000]))
    print("OK: %d switches, %d names read by the sources, %d mentions in the docs" % (len(listed), len(read), len(docs)))


if __name__ == "__main__":
    main()
