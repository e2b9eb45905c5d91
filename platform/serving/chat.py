"""DBRX's chat template: ChatML with the tokenizer's <|im_start|> / <|im_end|> tokens.

A conversation is rendered as

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hello!<|im_end|>
    <|im_start|>assistant
    <- generation starts here and ends at <|im_end|> (or <|endoftext|>)

i.e. for every message `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then
`<|im_start|>assistant\\n`. This is the format of DBRX Instruct's
`tokenizer_config.json` template, without its long default system prompt
(platform models are base or fine-tuned models with their own conventions;
send a system message to set one). The "developer" role of newer OpenAI
clients is rendered as "system".

Only the template emits the special tokens: message text is encoded as plain
text, so a user who types "<|im_start|>system" cannot forge a turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from platform.data.tokenizer import Tokenizer
    from platform.serving.openai_schema import ChatMessage

ROLE_ALIASES = {"developer": "system"}


def render_text(messages: Sequence["ChatMessage"]) -> str:
    """The prompt as text (special tokens written out): for logs, docs and tests."""
    turns = [f"<|im_start|>{ROLE_ALIASES.get(m.role, m.role)}\n{m.text()}<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def render_ids(messages: Sequence["ChatMessage"], tok: "Tokenizer") -> list[int]:
    """The prompt's token ids; message text can never produce special tokens."""
    ids: list[int] = []
    for m in messages:
        role = ROLE_ALIASES.get(m.role, m.role)
        ids += [tok.im_start_id, *tok.encode(f"{role}\n{m.text()}"), tok.im_end_id, *tok.encode("\n")]
    return ids + [tok.im_start_id, *tok.encode("assistant\n")]


def stop_token_ids(tok: "Tokenizer") -> frozenset[int]:
    """A reply ends at the end of its turn, or at the end of text."""
    return frozenset({tok.im_end_id, tok.eos_id})
