"""Compare `cpb estimate` with `cpb demo`'s measured CellProfiler time, several trials : `python tools/measure_estimate.py <scratch folder> <trials>` from the repo root, with .venv-cp built. Prints one JSON line per trial: the demo's summed CellProfiler wall time (its run records), the CPU seconds of its child processes (worker + CellProfiler), and `cpb estimate` of the same plate and layout on both clocks.."""
import json, os, resource, sys, time
from pathlib import Path
sys.path.insert(0, '.'); sys.path.insert(0, 'image')
from click.testing import CliRunner
from cpb.cli import cli
from cpb.demo.run import DemoSettings, run_demo

def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN); return r.ru_utime + r.ru_stime

out = Path(sys.argv[1]); trials = int(sys.argv[2])
for trial in range(trials):
    load0 = os.getloadavg()[0]
    c0 = cpu(); t0 = time.time()
    result = run_demo(DemoSettings(out_dir=out, echo=False))
    demo_cpu = cpu() - c0
    runs = json.loads((out / 'results' / '_cpb' / 'runs.json').read_text())
    demo_wall = sum(r['timings']['cellprofiler'] for r in runs)
    row = {'trial': trial, 'demo_ok': result.ok, 'demo_seconds': round(time.time() - t0, 1), 'load': round(load0, 1),
           'demo_cp_wall': round(demo_wall, 1), 'demo_children_cpu': round(demo_cpu, 1)}
    for clock in ('cpu', 'wall'):
        args = ['estimate', '--pipeline', 'cpb/pipelines/nuclei.cppipe', '--input', str(out / 'plate' / 'images'),
                '--data-file', str(out / 'plate' / 'load_data.csv'), '--image-sets-per-job', '2', '--vcpus', '1',
                '--memory', '4096', '--max-vcpus', '2', '--clock', clock, '--json']
        t1 = time.time()
        text = CliRunner().invoke(cli, args).output
        answer = json.loads(text[text.index('{'):])
        row[f'estimate_{clock}'] = round(answer['central']['cellprofiler_seconds'], 1)
        row[f'estimate_{clock}_seconds'] = round(time.time() - t1, 1)
        row['busy_factor'] = answer['profile']['busy_factor']
    row['err_wall_vs_demo_wall'] = f"{(row['estimate_wall'] - demo_wall) / demo_wall:+.0%}"
    row['err_cpu_vs_demo_wall'] = f"{(row['estimate_cpu'] - demo_wall) / demo_wall:+.0%}"
    print(json.dumps(row), flush=True)
