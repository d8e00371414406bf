// run_tool.h: running a tool binary from a test (found through the test's runfiles).
//
// Thread-safety: call from one thread at a time (the output files are per tool name).

#ifndef SANREG_TOOLS_INTERNAL_RUN_TOOL_H_
#define SANREG_TOOLS_INTERNAL_RUN_TOOL_H_

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace sanreg::tools {

// The path of tools/<name> in the test's runfiles (it must be a `data` dependency).
inline std::string ToolPath(const std::string& name) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  std::string base = srcdir ? srcdir : ".";
  return base + "/" + (ws ? ws : "sanreg") + "/tools/" + name;
}

inline std::string TmpDir() {
  const char* t = std::getenv("TEST_TMPDIR");
  return t ? t : "/tmp";
}

inline std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

// Runs tools/<name> with `args`, stdout and stderr to files; returns its exit code and output.
inline RunResult RunTool(const std::string& name, const std::vector<std::string>& args) {
  // Fresh files per run: a child of an earlier run that outlived it cannot write into these.
  static int runs = 0;
  ++runs;
  std::string out_path = TmpDir() + "/" + name + "_" + std::to_string(runs) + "_stdout";
  std::string err_path = TmpDir() + "/" + name + "_" + std::to_string(runs) + "_stderr";
  pid_t pid = fork();
  if (pid == 0) {
    int o = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0) _exit(127);
    dup2(o, 1);
    dup2(e, 2);
    std::string path = ToolPath(name);
    std::vector<char*> argv{path.data()};
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  RunResult r;
  int st = 0;
  if (pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st)) r.exit_code = WEXITSTATUS(st);
  r.out = Slurp(out_path);
  r.err = Slurp(err_path);
  return r;
}

}  // namespace sanreg::tools

#endif  // SANREG_TOOLS_INTERNAL_RUN_TOOL_H_
