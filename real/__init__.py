"""The GPU engine (issue: real offloaded MoE engine). Not built yet: it will drive the same
``policies`` controller with CUDA streams and events as its clock."""
