"""Tests of agentcpu.tools."""
