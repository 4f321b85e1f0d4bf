"""Test helpers that exercise real code paths: a scripted OpenAI-compatible HTTP server on 127.0.0.1."""

from recipe.testing.openai_server import FaultSchedule, RecordedRequest, Reply, ScriptedOpenAIServer, prompt_of

__all__ = ["FaultSchedule", "RecordedRequest", "Reply", "ScriptedOpenAIServer", "prompt_of"]
