"""Every official chat template under tests/templates/, each with a small offline tokenizer of its model's special
tokens (tests/chat_templates.py builds them), and what the generic masking test needs to know about it.

Families already in tests/chat_templates.py (SPECS) keep their names; the others are defined here.
"""

from dataclasses import dataclass

from tests.chat_templates import CHATML_TOKENS, LLAMA31_TOKENS, SPECS, Family, official

DEEPSEEK_TOKENS = (
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
)  # fmt: skip
COHERE_TOKENS = (
    "<BOS_TOKEN>", "<EOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
    "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>",
    "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>",
)  # fmt: skip
THINK = ("<think>", "</think>")
QWEN_ADDED = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
GRANITE_TOKENS = ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<|start_of_cite|>", "<|end_of_cite|>")
GLM_TOKENS = ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def cohere(template: str) -> Family:
    return Family(template, COHERE_TOKENS, bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", add_bos=True)


def deepseek(template: str) -> Family:
    return Family(template, DEEPSEEK_TOKENS, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True, added=THINK)


NEW_SPECS: dict[str, Family] = {
    "llama32": Family(official("meta-llama-Llama-3.2-3B-Instruct.jinja"), LLAMA31_TOKENS, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    "llama33": Family(official("meta-llama-Llama-3.3-70B-Instruct.jinja"), LLAMA31_TOKENS, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True),
    "qwen25": Family(official("Qwen-Qwen2.5-7B-Instruct.jinja"), CHATML_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", added=QWEN_ADDED),
    "qwq": Family(official("Qwen-QwQ-32B.jinja"), CHATML_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", added=THINK + QWEN_ADDED),
    "r1_distill_llama": deepseek(official("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja")),
    "r1_distill_qwen": deepseek(official("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")),
    "mistral_small": Family(
        official("Mistral-Small-3.2-24B-Instruct-2506.jinja"),
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]",
         "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[TOOL_CONTENT]", "[IMG]"),
        bos="<s>", eos="</s>", add_bos=True,
    ),  # fmt: skip
    "gemma2": Family(
        official("google-gemma-2-2b-it.jinja"), ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
    ),  # fmt: skip
    "phi4": Family(official("microsoft-phi-4.jinja"), ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"), bos=None, eos="<|im_end|>"),
    "granite33": Family(official("ibm-granite-granite-3.3-2B-Instruct.jinja"), GRANITE_TOKENS, bos=None, eos="<|end_of_text|>", added=THINK),
    "granite4": Family(official("ibm-granite-granite-4.0.jinja"), GRANITE_TOKENS, bos=None, eos="<|end_of_text|>", added=QWEN_ADDED),
    "command_r": cohere(official("CohereForAI-c4ai-command-r-v01.jinja")),
    "command_r_plus": cohere(official("CohereForAI-c4ai-command-r-plus-tool_use.jinja")),
    "smollm3": Family(official("HuggingFaceTB-SmolLM3-3B.jinja"), CHATML_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", added=THINK + QWEN_ADDED),
    "seed_oss": Family(
        official("ByteDance-Seed-OSS.jinja"), ("<seed:bos>", "<seed:eos>", "<seed:pad>"), bos="<seed:bos>", eos="<seed:eos>",
        pad="<seed:pad>",
        added=("<seed:think>", "</seed:think>", "<seed:tool_call>", "</seed:tool_call>", "<seed:cot_budget_reflect>", "</seed:cot_budget_reflect>"),
    ),  # fmt: skip
    "glm4": Family(official("THUDM-glm-4-9b-chat.jinja"), GLM_TOKENS, bos=None, eos="<|endoftext|>"),
    "glm46": Family(
        official("GLM-4.6.jinja"), GLM_TOKENS, bos=None, eos="<|endoftext|>", added=THINK + QWEN_ADDED + ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    ),  # fmt: skip
    # OLMo 2's role markers are plain text, and its GPT-4 style pre-tokenizer keeps the newlines after `|>` in one
    # token: `<|assistant|>\n` followed by an answer starting with "\n" tokenizes with `|>\n\n` across the two.
    "olmo2": Family(
        official("allenai-OLMo-2-1124-7B-Instruct.jinja"), ("<|endoftext|>", "<|pad|>"), bos="<|endoftext|>",
        eos="<|endoftext|>", pad="<|pad|>", pretokenizer="cl100k",
        corpus=("<|user|>\nHi\n<|assistant|>\n\nHello|>\n\n", "<|system|>\nBe brief.\n<|user|>\n\nWhy?\n<|assistant|>\n"),
    ),  # fmt: skip
}
SPECS.update(NEW_SPECS)


@dataclass(frozen=True)
class Official:
    family: str  # a key of SPECS
    source: str  # the file under tests/templates/
    end_of_turn: tuple[str, ...]  # what closes an assistant turn (the generic test's oracle reads these)
    kwargs: tuple[tuple[str, object], ...] = ()  # chat_template_kwargs of every sample
    string_arguments: bool = False  # the template concatenates tool-call arguments: they must be a JSON string


LLAMA_EOT = ("<|eot_id|>", "<|eom_id|>")
OFFICIAL: dict[str, Official] = {
    "llama31": Official("llama31", "meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA_EOT),
    "llama32": Official("llama32", "meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA_EOT),
    "llama33": Official("llama33", "meta-llama-Llama-3.3-70B-Instruct.jinja", LLAMA_EOT),
    "llama3": Official("llama3", "meta-llama-Meta-Llama-3-8B-Instruct.jinja", LLAMA_EOT),
    "qwen25": Official("qwen25", "Qwen-Qwen2.5-7B-Instruct.jinja", ("<|im_end|>",)),
    "qwen3": Official("qwen3", "Qwen-Qwen3-0.6B.jinja", ("<|im_end|>",)),
    "qwen3_no_thinking": Official("qwen3", "Qwen-Qwen3-0.6B.jinja", ("<|im_end|>",), (("enable_thinking", False),)),
    "qwq": Official("qwq", "Qwen-QwQ-32B.jinja", ("<|im_end|>",)),
    "r1_distill_llama": Official("r1_distill_llama", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", ("<｜end▁of▁sentence｜>",), string_arguments=True),
    "r1_distill_qwen": Official("r1_distill_qwen", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", ("<｜end▁of▁sentence｜>",), string_arguments=True),
    "deepseek_v31": Official("deepseek_v31", "deepseek-ai-DeepSeek-V3.1.jinja", ("<｜end▁of▁sentence｜>",)),
    "deepseek_v31_thinking": Official("deepseek_v31", "deepseek-ai-DeepSeek-V3.1.jinja", ("<｜end▁of▁sentence｜>",), (("thinking", True),)),
    "mistral_nemo": Official("mistral_nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", ("</s>",)),
    "mistral_small": Official("mistral_small", "Mistral-Small-3.2-24B-Instruct-2506.jinja", ("</s>",)),
    "gemma2": Official("gemma2", "google-gemma-2-2b-it.jinja", ("<end_of_turn>",)),
    "gemma3": Official("gemma", "google-gemma-3-270m-it.jinja", ("<end_of_turn>",)),
    "phi35": Official("phi3", "microsoft-Phi-3.5-mini-instruct.jinja", ("<|end|>",)),
    "phi4": Official("phi4", "microsoft-phi-4.jinja", ("<|im_end|>",)),
    "granite33": Official("granite33", "ibm-granite-granite-3.3-2B-Instruct.jinja", ("<|end_of_text|>",)),
    "granite4": Official("granite4", "ibm-granite-granite-4.0.jinja", ("<|end_of_text|>",)),
    "command_r": Official("command_r", "CohereForAI-c4ai-command-r-v01.jinja", ("<|END_OF_TURN_TOKEN|>",)),
    "command_r_plus": Official("command_r_plus", "CohereForAI-c4ai-command-r-plus-tool_use.jinja", ("<|END_OF_TURN_TOKEN|>",)),
    "command_r7b": Official("command_r7b", "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", ("<|END_OF_TURN_TOKEN|>",)),
    # with enable_thinking the opener it writes after the last message is `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`
    # (without it, `...<|START_THINKING|><|END_THINKING|>`): never trained
    "command_r7b_thinking": Official(
        "command_r7b", "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", ("<|END_OF_TURN_TOKEN|>",), (("enable_thinking", True),)
    ),
    "gpt_oss": Official("harmony", "openai-gpt-oss-120b.jinja", ("<|end|>", "<|return|>", "<|call|>")),
    "hermes3": Official("hermes3", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ("<|im_end|>",)),
    "smollm2": Official("chatml", "HuggingFaceTB-SmolLM2-135M-Instruct.jinja", ("<|im_end|>",)),
    "smollm3": Official("smollm3", "HuggingFaceTB-SmolLM3-3B.jinja", ("<|im_end|>",)),
    "olmo2": Official("olmo2", "allenai-OLMo-2-1124-7B-Instruct.jinja", ("<|endoftext|>",)),
    "seed_oss": Official("seed_oss", "ByteDance-Seed-OSS.jinja", ("<seed:eos>",)),
    "glm4": Official("glm4", "THUDM-glm-4-9b-chat.jinja", ()),
    "glm46": Official("glm46", "GLM-4.6.jinja", ()),
}
