"""Chat with a running `hetinfer serve` through the official openai package, streaming the answers.

    hetinfer serve &                      # http://127.0.0.1:8000/v1
    python examples/chat_client.py        # type a message; an empty line or Ctrl-D quits

The `openai` package comes with the server's extra: `pip install -e '.[serve]'` (scripts/install.sh
installs it).

Any OpenAI-compatible tool works the same way: base URL http://127.0.0.1:8000/v1, the API key
given to `hetinfer serve --api-key` (any text when the server has none).
"""
from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description="stream a chat with a hetinfer server")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("HETINFER_API_KEY", "none"))
    ap.add_argument("--system", default="You are a helpful assistant. Answer briefly.")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # a hetinfer server serves one model
    print(f"chatting with {model} at {args.base_url}; an empty line quits")
    messages = [{"role": "system", "content": args.system}]
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                temperature=args.temperature, stream=True)
        reply = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
