// cli.h: command-line checks shared by the tools: a bad flag is one line on stderr and exit 2.
//
// Abseil's own parse errors exit 1 and print several lines, so the tools check every flag name
// and value first (PrecheckArgs), then let absl::ParseCommandLine parse what is known to be good.
//
// Thread-safety: call from main, before any thread starts.

#ifndef SANREG_TOOLS_INTERNAL_CLI_H_
#define SANREG_TOOLS_INTERNAL_CLI_H_

#include <string>

namespace sanreg::tools {

// Prints "<tool>: <msg> (see --help)" on stderr and exits 2.
[[noreturn]] void UsageError(const char* tool, const std::string& msg);

// Checks that every flag in argv is a defined flag with a value its type parses (flag values are
// left as they were); --help and its kin pass. Positional arguments are refused unless
// `positional_ok`. Calls UsageError on the first problem.
void PrecheckArgs(const char* tool, int argc, char** argv, bool positional_ok = false);

}  // namespace sanreg::tools

#endif  // SANREG_TOOLS_INTERNAL_CLI_H_
