"""Small offline Hugging Face tokenizers for the chat-template families that real models ship.

Each family pairs a model's official Jinja chat template (verbatim files under tests/templates/, sources in
tests/templates/SOURCES.md; a few hand-written cores remain where they test what no official text shows) with a
tiny byte-level BPE vocabulary (about 1k tokens, trained in a fraction of a second on the corpus below) and the
family's special tokens. Where
the real tokenizer's post-processor adds a BOS (Llama-3, Mistral, Gemma), so does ours: tokenizing an already
rendered conversation with `add_special_tokens=True` doubles the BOS, as it does in real life.

Only `chatml_gen` has `{% generation %}` tags; the official templates of the other families have none.

    build_tokenizer("llama3", tmp_dir)  # -> tmp_dir / "llama3", loadable with AutoTokenizer.from_pretrained
"""

from dataclasses import dataclass, field
from pathlib import Path


VOCAB_SIZE = 1024
TEMPLATES = Path(__file__).resolve().parent / "templates"


def official(name: str) -> str:
    """An official chat template, verbatim (tests/templates/SOURCES.md says where each comes from)."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


# SmolLM2-135M-Instruct's shipped template: it injects a default system prompt when none is given.
CHATML = official("HuggingFaceTB-SmolLM2-135M-Instruct.jinja")

# Core kept: no official template has {% generation %} tags. ChatML with them around what the assistant produces
# (content and its <|im_end|>).
CHATML_GEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template: content is trimmed, the BOS is rendered by the template.
LLAMA3 = official("meta-llama-Meta-Llama-3-8B-Instruct.jinja")

# Core kept (no official v0.3 text at hand; Nemo's and Small 3.2's are below): Mistral-7B-Instruct-v0.3 style, no
# system role, the system prompt moved into the last user turn, and ' ' + content|trim after [/INST] (a space the
# model writes, which no official template here has).
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.index0 == ns.last_user and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Gemma-3 (gemma-3-270m-it): roles user/model, the system prompt is prepended to the first user turn, trimmed.
GEMMA = official("google-gemma-3-270m-it.jinja")

# Phi-3.5-mini-instruct's template: an EOS closes the conversation after the last <|end|>.
PHI3 = official("microsoft-Phi-3.5-mini-instruct.jinja")

# Qwen3's template: tools in the system turn, reasoning dropped from assistant turns before the last user query,
# an empty think block on the last turn, tool calls as <tool_call> JSON, tool results inside a user turn.
QWEN3 = official("Qwen-Qwen3-0.6B.jinja")


@dataclass(frozen=True)
class Family:
    template: str | dict[str, str]  # several, by name, as Hermes-3 ships them
    special: tuple[str, ...]  # special tokens (skipped by decode(skip_special_tokens=True))
    bos: str | None
    eos: str
    pad: str | None = None
    add_bos: bool = False  # the real tokenizer's post-processor prepends the BOS
    added: tuple[str, ...] = field(default=())  # added but not special, as Qwen3's <think>, <tool_call>, ...
    # "cl100k": the GPT-4 style split that keeps newlines after punctuation in one token (OLMo 2's `|>\n\n`)
    pretokenizer: str = "gpt2"
    corpus: tuple[str, ...] = ()  # extra training text, so merges across template text exist


CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

SPECS: dict[str, Family] = {
    "chatml": Family(CHATML, CHATML_TOKENS, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>"),
    "chatml_gen": Family(CHATML_GEN, CHATML_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "llama3": Family(
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
    ),
    "mistral": Family(MISTRAL, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>", add_bos=True),
    "gemma": Family(
        GEMMA,
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos=True,
    ),
    "phi3": Family(
        PHI3,
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
    ),
    "qwen3": Family(
        QWEN3,
        CHATML_TOKENS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    ),
}
FAMILIES: tuple[str, ...] = tuple(SPECS)

# Enough varied text for BPE to learn merges for common words, JSON, code and a little non-ASCII.
CORPUS = [
    "You are a helpful AI assistant. Answer the question of the user as well as you can.",
    "Hello! How are you today? I am fine, thank you. What is your name? My name is Assistant.",
    "The quick brown fox jumps over the lazy dog. The weather is nice and the sun is shining.",
    "What is the capital of France? The capital of France is Paris, a city on the river Seine.",
    "Can you help me write a function in Python that returns the sum of a list of numbers?",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    '{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}',
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the weather", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}',
    "Let me think step by step. First, we add the numbers. Then we divide by two. The answer is 42.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side!",
    "I like reading books, playing music and learning about science, history and mathematics.",
    "Größe, café, naïve, Ελληνικά, русский, 日本語, 中文, 한국어, emoji 🙂🚀 and symbols € £ ¥ ©.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.718 -1 +1 = < > ( ) [ ] { } ; : , . ! ?",
]


# OLMo 2's (and GPT-4's) pre-tokenizer split
CL100K_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_vocab(spec: Family) -> "Tokenizer":  # noqa: F821
    """A byte-level BPE (every string encodes, decode(encode(s)) == s) with the family's special tokens."""
    # imported here, as in build_tokenizer: tests/conftest.py imports this module in pytest-xdist's controller too,
    # which runs no test
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    if spec.pretokenizer == "cl100k":
        split = pre_tokenizers.Split(Regex(CL100K_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(spec.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((CORPUS + list(spec.corpus)) * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    if spec.add_bos:
        bos_id = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    return tokenizer


def build_tokenizer(family: str, out_dir: Path) -> Path:
    """Save the family's tokenizer (vocab, special tokens, chat template) to out_dir/family and return that path."""
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[family]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_vocab(spec),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token="<unk>" if "<unk>" in spec.special else None,
        chat_template=spec.template,
    )
    path = Path(out_dir) / family
    tokenizer.save_pretrained(path)
    return path


# ---- tool calling and reasoning: written after the official templates (issue 15) ----
# Not in FAMILIES (the generic per-family tests use plain conversations some of these refuse, e.g. Hermes-3's
# tool_use template needs `tools`); tests/test_chat_templates.py checks each against the masking rule.

# Llama-3.1-8B-Instruct's template: tools in the first user turn, one JSON tool call per turn or, with
# `builtin_tools`, `<|python_tag|>name.call(...)` closed by <|eom_id|>; tool results as ipython turns, tojson'd.
LLAMA31 = official("meta-llama-Llama-3.1-8B-Instruct.jinja")

# Mistral-Nemo-Instruct-2407's template (v3-tekken): tools before the last user turn, [TOOL_CALLS] turns with
# 9-character ids, tool results in [TOOL_RESULTS]; no generation prompt; the system prompt goes into the last user turn.
MISTRAL_NEMO = official("mistralai-Mistral-Nemo-Instruct-2407.jinja")

# gpt-oss's harmony template: a system and a developer turn, earlier turns' analysis dropped, the final assistant
# turn closed by <|return|> and earlier ones by <|end|>, tool calls to=functions.NAME <|call|>. It writes today's
# date (strftime_now): tests compare renders made within one test.
HARMONY = official("openai-gpt-oss-120b.jinja")

# Hermes-3-Llama-3.1's `tool_use` template: tools are iterated unconditionally, so it fails without them; tool
# calls as <tool_call> JSON, tool results in a `tool` turn.
HERMES3_TOOL_USE = official("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja")

# Core kept (llama.cpp keeps only Hermes-3's tool_use template): its default template, plain ChatML with the BOS.
HERMES3_DEFAULT = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# c4ai-command-r7b-12-2024's tool_use template: a long system preamble turn always, answers wrapped in
# <|START_RESPONSE|>...<|END_RESPONSE|>, tool calls as a plan (reasoning_content) and an action, and
# <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|> after the last message whatever add_generation_prompt says.
COMMAND_R7B = official("CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja")

# DeepSeek-V3.1's template: `thinking` (false by default) picks the generation prompt's </think> or <think>;
# history always shows </think> after <｜Assistant｜>; tool calls with string arguments; after a tool output
# the next assistant turn has no header and no generation prompt.
DEEPSEEK_V31 = official("deepseek-ai-DeepSeek-V3.1.jinja")

LLAMA31_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>",
)  # fmt: skip
TOOL_SPECS: dict[str, Family] = {
    "llama31": Family(LLAMA31, LLAMA31_TOKENS, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    "mistral_nemo": Family(
        MISTRAL_NEMO,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
         "[/TOOL_RESULTS]", "[TOOL_CALLS]"),
        bos="<s>",
        eos="</s>",
        add_bos=True,
    ),  # fmt: skip
    "harmony": Family(
        HARMONY,
        ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"),
        bos=None,
        eos="<|return|>",
        pad="<|endoftext|>",
    ),
    "hermes3": Family(
        {"default": HERMES3_DEFAULT, "tool_use": HERMES3_TOOL_USE},
        ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
        bos="<|begin_of_text|>",
        eos="<|im_end|>",
        added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    ),
    "command_r7b": Family(
        COMMAND_R7B,
        ("<BOS_TOKEN>", "<EOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
         "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>",
         "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"),
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        add_bos=True,
    ),  # fmt: skip
    "deepseek_v31": Family(
        DEEPSEEK_V31,
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
         "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
         "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"),
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        added=("<think>", "</think>"),
    ),  # fmt: skip
}
TOOL_FAMILIES: tuple[str, ...] = tuple(TOOL_SPECS)
SPECS.update(TOOL_SPECS)
