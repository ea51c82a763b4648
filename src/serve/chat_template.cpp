#include "serve/chat_template.h"

#include <string_view>

#include "core/error.h"

namespace dsv4::serve {
namespace {

// The exact marker strings of DeepSeek-V3's tokenizer_config.json chat_template.
constexpr std::string_view kBos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>";
constexpr std::string_view kEos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";
constexpr std::string_view kUser = "<\uFF5CUser\uFF5C>";
constexpr std::string_view kAssistant = "<\uFF5CAssistant\uFF5C>";
constexpr std::string_view kToolOutputsBegin = "<\uFF5Ctool\u2581outputs\u2581begin\uFF5C>";
constexpr std::string_view kToolOutputsEnd = "<\uFF5Ctool\u2581outputs\u2581end\uFF5C>";
constexpr std::string_view kToolOutputBegin = "<\uFF5Ctool\u2581output\u2581begin\uFF5C>";
constexpr std::string_view kToolOutputEnd = "<\uFF5Ctool\u2581output\u2581end\uFF5C>";

}  // namespace

std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out(kBos);
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out += "\n\n";
    out += m.content;
    first_system = false;
  }

  bool after_tool = false;     // the template's ns.is_tool
  bool first_output = true;    // ns.is_output_first; the template never resets it
  for (const ChatMessage& m : messages) {
    if (m.role == "system") {
      continue;
    } else if (m.role == "user") {
      after_tool = false;
      out += kUser;
      out += m.content;
    } else if (m.role == "assistant") {
      out += after_tool ? kToolOutputsEnd : kAssistant;
      out += m.content;
      out += kEos;
      after_tool = false;
    } else if (m.role == "tool") {
      after_tool = true;
      if (first_output) {
        out += kToolOutputsBegin;
        first_output = false;
      } else {
        out += '\n';
      }
      out += kToolOutputBegin;
      out += m.content;
      out += kToolOutputEnd;
    } else {
      core::fail("chat message has unknown role '{}' (expected system, user, assistant or tool)",
                 m.role);
    }
  }
  if (after_tool) {
    out += kToolOutputsEnd;
  } else if (add_generation_prompt) {
    out += kAssistant;
  }
  return out;
}

}  // namespace dsv4::serve
