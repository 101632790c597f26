"""`python-tool`: agentic tool use (K2 §3.2): the policy may run Python before it answers.

    Task("t1", ({"role": "user", "content": "What is 2**100 mod 7?"},), "math", reward="math",
         reward_spec={"answer": "2"}, env="python-tool", env_kwargs={"limits": {"timeout_s": 5}})

The tool call format. A reply that contains a fenced block opened by ```python (also ```py or
```python3) and closed by ``` is a tool call:

    Let me compute it.
    ```python
    print(pow(2, 100, 7))
    ```

The last such block runs as a fresh program (`python3 main.py` in an empty directory of the
process's shared sandbox, sandboxes/shared.py): nothing persists between calls, and only what it
prints comes back. The result is one `{"role": "tool", "content": ...}` message:
- the program's stdout, then its stderr;
- unless it ended well, a first line with the sandbox's status: `[status: runtime_error, exit code 1]`,
  `[status: timeout]`, `[status: memory_limit]`, `[status: output_limit]`, `[status: sandbox_error]`;
- `(no output)` when it printed nothing;
- at most `max_output_chars` characters of output (2,000 unless set): longer output keeps its first
  and last halves around a `[... N characters cut ...]` line.
A program that errors, loops or tries to escape gets its status back like any other: the episode
goes on, and a tool call never holds the episode longer than the sandbox's time limit.

A reply without a python block is the final answer: it ends the episode with step reward 0, and
the task's reward (e.g. "math") scores it. Blocks without a language tag (```) do not run.

The prompt is the task's messages, with `instructions` (the format above, in short; "" for none)
as the system message, or appended to the task's own system message.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from rl.records import Task
from rollout.environments.base import Environment, Message, ResetResult, StepResult
from sandboxes import STATUS_OK, STATUS_RUNTIME_ERROR, RunRequest, RunResult, SandboxLimits
from sandboxes.shared import shared_sandbox

INSTRUCTIONS = (
    "You can run Python code: write it in a ```python fenced block and end your reply there. "
    "The code runs as a new program each time; you see what it prints. "
    "Reply without a code block to give your final answer."
)
_TOOL_CALL = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class PythonTool(Environment):
    def __init__(self, instructions: str = INSTRUCTIONS, limits: dict[str, Any] | None = None,
                 max_output_chars: int = 2000):
        if max_output_chars < 100:
            raise ValueError(f"max_output_chars must be >= 100, got {max_output_chars!r}")
        self.instructions = instructions
        # None: the sandbox's own limits.
        self.limits = SandboxLimits(**limits) if limits is not None else None
        self.max_output_chars = max_output_chars

    async def reset(self, task: Task, seed: int) -> ResetResult:
        if not task.messages:
            raise ValueError(f"task {task.task_id!r} has no messages: python-tool needs the question as the prompt")
        messages: list[Message] = [dict(message) for message in task.messages]
        if self.instructions:
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{self.instructions}"
            else:
                messages.insert(0, {"role": "system", "content": self.instructions})
        return messages, {}

    async def step(self, action: str) -> StepResult:
        blocks = _TOOL_CALL.findall(action)
        if not blocks:
            return [], 0.0, True, False, {"tool_calls": 0}
        request = RunRequest(files={"main.py": blocks[-1]}, command=("python3", "main.py"))
        # In a thread: the first use opens the sandbox (a Docker pool takes seconds), and the driver's
        # event loop must not stop for it.
        sandbox = await asyncio.to_thread(shared_sandbox)
        result = await sandbox.run(request, self.limits)
        observation = {"role": "tool", "content": self._report(result)}
        return [observation], 0.0, False, False, {"tool_calls": 1, "status": result.status}

    def _report(self, result: RunResult) -> str:
        output = result.stdout + result.stderr
        if len(output) > self.max_output_chars:
            half = self.max_output_chars // 2
            cut = len(output) - 2 * half
            output = f"{output[:half]}\n[... {cut} characters cut ...]\n{output[len(output) - half:]}"
        if result.status == STATUS_OK:
            return output or "(no output)"
        exit_code = f", exit code {result.exit_code}" if result.status == STATUS_RUNTIME_ERROR else ""
        return f"[status: {result.status}{exit_code}]\n{output or '(no output)'}"
