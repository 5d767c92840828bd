"""OpenAI request bodies (strictly typed) and the OpenAI error body.

Sampling ranges are OpenAI's; top_k, min_p and repeat_penalty are llama.cpp-server extensions.
Other OpenAI fields (user, logit_bias, ...) are accepted and ignored.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hetinfer.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # "5" is not an int, true is not a number


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_dict(self) -> dict:
        """The message as chat templates expect it: system role, plain-text content."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str | None = None  # omitted: the model this server serves (as llama.cpp's server does)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repeat_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """SamplingParams from the fields the client set (hetinfer's defaults for the rest)."""
        given = self.model_dump(include={"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"},
                                exclude_none=True)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(**given, max_tokens=max_tokens, stop=stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="one prompt (a list must hold exactly one)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, p: str | list[str]) -> str | list[str]:
        if isinstance(p, list) and len(p) != 1:
            raise ValueError("give exactly one prompt (batches of prompts are not supported)")
        return p

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
