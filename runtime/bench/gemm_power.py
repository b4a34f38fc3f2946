# Run on the GPU machine: /opt/torch/.venv/bin/python3 runtime/bench/gemm_power.py (results:
# results/h100-sxm/raw/h100_runE_memory_determinism.jsonl)
# Why training's GEMMs run faster than the calibration's: data, duty cycle, clocks.
import torch, json, subprocess, time, threading
dev = "cuda"
torch.manual_seed(0)
m, k, n = 32768, 4096, 14336
def ev(): return torch.cuda.Event(enable_timing=True)
samples = []
stop = False
def smi():
    p = subprocess.Popen(["nvidia-smi","--query-gpu=clocks.sm,power.draw","--format=csv,noheader,nounits","-lms","100"],stdout=subprocess.PIPE,text=True)
    for line in p.stdout:
        if stop: break
        try:
            c, w = line.strip().split(", "); samples.append((time.time(), float(c), float(w)))
        except Exception: pass
    p.kill()
th = threading.Thread(target=smi, daemon=True); th.start()
def triplet(x, w, dy):
    y = torch.nn.functional.linear(x, w); dx = dy @ w; dw = dy.t() @ x
def run(name, x, w, dy, filler=None, secs=4.0):
    for _ in range(3): triplet(x, w, dy)
    torch.cuda.synchronize()
    t_end = time.time() + secs; times = []; t0 = time.time()
    while time.time() < t_end:
        evs = []
        for _ in range(10):
            a, b = ev(), ev(); a.record(); triplet(x, w, dy); b.record(); evs.append((a, b))
            if filler is not None: filler()
        torch.cuda.synchronize()
        times += [a.elapsed_time(b) for a, b in evs]
    t1 = time.time()
    s = [c for (t, c, p) in samples if t0 + 1 < t < t1]; pw = [p for (t, c, p) in samples if t0 + 1 < t < t1]
    times = sorted(times)[len(times)//4:]  # drop the first quarter by value? keep median
    med = sorted(times)[len(times)//2]
    print(json.dumps({"case": name, "triplet_ms": med, "tflops": 3*2*m*k*n/med/1e9, "sm_mhz_median": sorted(s)[len(s)//2] if s else None, "power_w_median": sorted(pw)[len(pw)//2] if pw else None}), flush=True)
bf = torch.bfloat16
x = torch.randn(m, k, device=dev, dtype=bf); w = torch.randn(n, k, device=dev, dtype=bf); dy = torch.randn(m, n, device=dev, dtype=bf)
run("randn_all_back_to_back", x, w, dy)
w2 = (torch.randn(n, k, device=dev) * 0.02).to(bf); dy2 = (torch.randn(m, n, device=dev) * 1e-4).to(bf)
run("init_scale_weights_back_to_back", x, w2, dy2)
big = torch.empty(1024*1024*1024 // 2, device=dev, dtype=bf); big2 = torch.empty_like(big)
def filler(): big2.copy_(big)   # ~0.7 ms at 3 TB/s
def filler4():
    for _ in range(4): big2.copy_(big)
run("randn_duty_cycle_copy_0.7ms", x, w, dy, filler)
run("randn_duty_cycle_copy_2.8ms", x, w, dy, filler4)
run("init_scale_duty_cycle_copy_2.8ms", x, w2, dy2, filler4)
time.sleep(3)
run("randn_after_idle_back_to_back", x, w, dy, secs=1.5)
stop = True
