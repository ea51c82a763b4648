// The DeepSeek chat format: turns a conversation into the prompt text the model expects.
#pragma once

#include <string>
#include <vector>

namespace dsv4::serve {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
};

// Renders `messages` like the chat_template of DeepSeek-V3's tokenizer_config.json
// (non-thinking; tool calls by the assistant are not representable here):
//
//   <｜begin▁of▁sentence｜>{system prompts joined by "\n\n"}
//   user:       <｜User｜>{content}
//   assistant:  <｜Assistant｜>{content}<｜end▁of▁sentence｜>
//               (right after tool output: <｜tool▁outputs▁end｜>{content}<｜end▁of▁sentence｜>)
//   tool:       first one of the conversation:
//                 <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>
//               later ones: \n<｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>
//   end:        <｜tool▁outputs▁end｜> if the last turn was tool output, otherwise
//               <｜Assistant｜> when add_generation_prompt.
//
// System messages anywhere in the list go to the front, as the template does. The
// result is meant to be encoded with allow_special=true so the markers become tokens.
// Throws core::Error for a role outside the four above, naming it.
std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt);

}  // namespace dsv4::serve
