"""What the tools' check scripts share: failing with a message, and their arguments (the script or
binary under test, then a folder for their files) with a file stem in that folder of their own."""
import os
import sys


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def target_and_stem(name):
    """(argv[1], argv[2]/NAME_PID), the folder made if missing."""
    target, tmp = sys.argv[1], sys.argv[2]
    os.makedirs(tmp, exist_ok=True)
    return target, os.path.join(tmp, "%s_%d" % (name, os.getpid()))


def expect_failure_naming(result, option, what):
    """A finished subprocess that must have failed with `option` in its error output."""
    if result.returncode == 0 or option not in result.stderr:
        fail("%s must fail naming %s: exit %d, %s" % (what, option, result.returncode, result.stderr))
