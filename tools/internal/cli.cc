// cli.cc: see cli.h.

#include "tools/internal/cli.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"

namespace sanreg::tools {

void UsageError(const char* tool, const std::string& msg) {
  std::fprintf(stderr, "%s: %s (see --help)\n", tool, msg.c_str());
  std::exit(2);
}

void PrecheckArgs(const char* tool, int argc, char** argv, bool positional_ok) {
  auto Usage = [tool](const std::string& m) { UsageError(tool, m); };
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') {
      if (positional_ok) continue;
      Usage(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string body = arg.substr(arg[1] == '-' ? 2 : 1);
    std::string name = body, value;
    bool has_value = false;
    if (size_t eq = body.find('='); eq != std::string::npos) {
      name = body.substr(0, eq);
      value = body.substr(eq + 1);
      has_value = true;
    }
    if (name == "help" || name == "helpfull" || name == "helpshort" || name == "version" ||
        name == "helpon" || name == "helpmatch" || name == "helppackage") {
      continue;
    }
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    bool negated = false;
    if (flag == nullptr && name.rfind("no", 0) == 0) {
      flag = absl::FindCommandLineFlag(name.substr(2));
      negated = flag != nullptr && flag->IsOfType<bool>();
      if (!negated) flag = nullptr;
    }
    if (flag == nullptr) Usage(absl::StrCat("unknown flag --", name));
    if (negated) {
      if (has_value) Usage(absl::StrCat("--", name, " takes no value"));
      continue;
    }
    if (!has_value) {
      if (flag->IsOfType<bool>()) continue;
      if (i + 1 >= argc) Usage(absl::StrCat("missing value for --", name));
      value = argv[++i];
    }
    std::string error;
    std::string saved = flag->CurrentValue();
    if (!flag->ParseFrom(value, &error)) {
      Usage(absl::StrCat("bad value '", value, "' for --", name, ": ", error));
    }
    (void)flag->ParseFrom(saved, &error);
  }
}

}  // namespace sanreg::tools
