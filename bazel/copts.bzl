"""The one place for sanreg's compiler flags (STYLE.md rule 3)."""

# Every sanreg target.
SANREG_COPTS = [
    "-std=c++20",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
    "-fno-strict-aliasing",
]

# Tests and benchmarks: the same, with the warnings GoogleTest's macros trip relaxed.
SANREG_TEST_COPTS = SANREG_COPTS + [
    "-Wno-sign-compare",
    "-Wno-dangling-else",
]
