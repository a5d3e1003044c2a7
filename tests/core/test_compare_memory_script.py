"""compare_memory from a script without an ``if __name__ == "__main__":`` guard, and a
measuring process that dies: an answer (or a clear error) at once, never a hang."""
import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from gsr_compiler.memory import measure_step_in_subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model class and the loss live in the script itself (its __main__), as in the README.
SCRIPT = textwrap.dedent('''
    import torch
    import torch_geometric.nn as pyg
    from torch import nn
    from gsr_compiler import compare_memory, gsr_compile

    class ScriptGNN(nn.Module):
        def __init__(self, width=32, depth=6):
            super().__init__()
            self.encoder = nn.Linear(4, width)
            self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
            self.convs = nn.ModuleList(pyg.GraphConv(width, width) for _ in range(depth))
            self.decoder = nn.Linear(width, 1)

        def forward(self, x, edge_index):
            h = self.encoder(x)
            for norm, conv in zip(self.norms, self.convs):
                h = h + conv(torch.relu(norm(h)), edge_index)
            return self.decoder(h)

    torch.manual_seed(0)
    x = torch.randn(3000, 4)
    edge_index = torch.randint(0, 3000, (2, 9000))
    y = torch.randn(3000, 1)
    model = ScriptGNN()
    gsr_model = gsr_compile(model, example_inputs=(x, edge_index))
    result = compare_memory(model, gsr_model, (x, edge_index), target=y, timing_steps=1,
                            loss_fn=lambda out, t: (out - t).abs().mean())
    print(result)
    assert result.before.error is None and result.after.error is None
    print("saved ratio", result.ratio("saved_bytes"))
''')


def test_compare_memory_from_a_script_without_main_guard(tmp_path):
    script = tmp_path / "train_unguarded.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GSR_CHILD_THREADS="1")
    # The model pickled for the old spawned child was larger than a pipe buffer: 64 KiB.
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "saved for backward" in done.stdout and "peak RSS" in done.stdout
    assert "failed" not in done.stdout
    ratio = float(done.stdout.split("saved ratio")[1])
    assert 0 < ratio < 0.5


class DiesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        os._exit(7)  # as the out-of-memory killer or a crash would end the process


def test_a_dying_measuring_process_is_reported_at_once():
    m = measure_step_in_subprocess(DiesInForward(), (torch.randn(5, 4),), timing_steps=0)
    assert m.error is not None and "died (exit code 7)" in m.error

