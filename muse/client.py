"""`muse generate`: submit a job to a running server, follow its events, write the PNG(s)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


def body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "prompt": args.prompt,
        "quality": args.quality,
        "steps": args.steps,
        "seed": args.seed,
        "negative_prompt": args.negative,
        "guidance_scale": args.guidance,
        "width": args.width,
        "height": args.height,
        "n": args.n,
    }
    return {k: v for k, v in fields.items() if v is not None}


def file_stem(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def iter_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from server-sent event lines; comments and keep-alives are skipped."""
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def follow(client: httpx.Client, events_url: str) -> dict[str, Any]:
    """Show queue position, then steps; return the final job document."""
    bar: tqdm[Any] | None = None
    final: dict[str, Any] = {}
    with client.stream("GET", events_url, timeout=None) as stream:
        for event, data in iter_events(stream.iter_lines()):
            if event == "queued":
                print(f"queued: {data.get('position', 0)} image(s) ahead", file=sys.stderr)
            elif event == "progress":
                if bar is None:
                    bar = tqdm(total=data["steps"], desc="generating", unit="step", file=sys.stderr)
                bar.n = data["step"]
                bar.refresh()
            elif event in ("succeeded", "failed", "cancelled"):
                final = data
                break
    if bar is not None:
        bar.close()
    return final


def generate(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("MUSE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
            response = client.post("/api/jobs", json=body_from_args(args))
            if response.status_code != 202:
                print(f"error: {error_message(response)}", file=sys.stderr)
                return 1
            job = response.json()
            final = follow(client, job["events_url"])
            if not final:
                final = client.get(job["status_url"]).json()
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if final.get("status") != "succeeded":
        print(f"error: {final.get('error', {}).get('message', final.get('status'))}", file=sys.stderr)
        return 1
    images = final["result"]["images"]
    stem = Path(args.output).with_suffix("") if args.output else Path(file_stem(args.prompt))
    for i, image in enumerate(images):
        path = stem.with_suffix(".png") if len(images) == 1 else Path(f"{stem}-{i + 1}.png")
        path.write_bytes(base64.b64decode(image["png_base64"]))
        print(f"{path}  seed={image['seed']}")
    return 0
