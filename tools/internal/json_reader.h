// json_reader.h: a minimal JSON reader for the tools' tests (objects, arrays, strings without
// escapes, numbers, true/false/null). Enough to check what the tools write; not a general parser.
//
// Thread-safety: a JsonReader is used by one thread.

#ifndef SANREG_TOOLS_INTERNAL_JSON_READER_H_
#define SANREG_TOOLS_INTERNAL_JSON_READER_H_

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace sanreg::tools {

struct Json;
using JsonObject = std::map<std::string, Json>;
using JsonArray = std::vector<Json>;
struct Json {
  std::variant<std::nullptr_t, bool, double, std::string, JsonArray, JsonObject> v;
  bool is_number() const { return std::holds_alternative<double>(v); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  double num() const { return std::get<double>(v); }
  const std::string& str() const { return std::get<std::string>(v); }
  const JsonArray& arr() const { return std::get<JsonArray>(v); }
  const JsonObject& obj() const { return std::get<JsonObject>(v); }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& s) : s_(s) {}
  bool Read(Json* out) {
    if (!Value(out)) return false;
    Skip();
    return i_ == s_.size();
  }

 private:
  void Skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool Eat(char c) {
    Skip();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool String(std::string* out) {
    if (!Eat('"')) return false;
    size_t end = s_.find('"', i_);
    if (end == std::string::npos) return false;
    *out = s_.substr(i_, end - i_);
    if (out->find('\\') != std::string::npos) return false;
    i_ = end + 1;
    return true;
  }
  bool Value(Json* out) {
    Skip();
    if (i_ >= s_.size()) return false;
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      JsonObject o;
      if (!Eat('}')) {
        do {
          std::string k;
          Json v;
          if (!String(&k) || !Eat(':') || !Value(&v) || o.count(k)) return false;
          o.emplace(k, std::move(v));
        } while (Eat(','));
        if (!Eat('}')) return false;
      }
      out->v = std::move(o);
      return true;
    }
    if (c == '[') {
      ++i_;
      JsonArray a;
      if (!Eat(']')) {
        do {
          Json v;
          if (!Value(&v)) return false;
          a.push_back(std::move(v));
        } while (Eat(','));
        if (!Eat(']')) return false;
      }
      out->v = std::move(a);
      return true;
    }
    if (c == '"') {
      std::string str;
      if (!String(&str)) return false;
      out->v = str;
      return true;
    }
    for (const char* lit : {"null", "true", "false"}) {
      if (s_.compare(i_, std::strlen(lit), lit) == 0) {
        i_ += std::strlen(lit);
        if (lit[0] == 'n') out->v = nullptr;
        else out->v = lit[0] == 't';
        return true;
      }
    }
    const char* start = s_.c_str() + i_;
    char* end = nullptr;
    double d = std::strtod(start, &end);
    if (end == start) return false;
    i_ += static_cast<size_t>(end - start);
    out->v = d;
    return true;
  }
  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace sanreg::tools

#endif  // SANREG_TOOLS_INTERNAL_JSON_READER_H_
