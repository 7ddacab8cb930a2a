rule render_report:
    input:
        fits=expand(rules.fit_scaling.output[0], workload=WORKLOADS),
        hessian=hessian_aggregates,
        stability=stability_files,
        ghost=ghost_summaries,
        noise=noise_outputs,
        quick=quick_estimates,
        branch=branch_files,
        benchmarks=lambda w: [path for paths in job_benchmarks(w).values() for path in paths],
        notebook=REPORT_NOTEBOOK,
        template=REPORT_TEMPLATE,
    output:
        html="results/report/report.html",
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="batch-size study",
        ),
    log:
        "logs/render_report/render_report.log",
    benchmark:
        "results/benchmarks/render_report/render_report.tsv"
    localrule: True
    conda:
        "../envs/batchscope.yaml"
    params:
        version=STAGES["render_report"].version,
        benchmarks=lambda w: benchmark_pairs(job_benchmarks(w)),
        # a function: a plain string's {workload} would be taken for a wildcard of this rule
        train_benchmarks=lambda w: f"--train-benchmarks '{rules.train_batch_size.benchmark}'" if ADAPTIVE else "",
        branch_benchmarks=lambda w: (
            f"--branch-benchmarks '{rules.branch_checkpoint.benchmark}'" if config["branch"]["enabled"] else ""
        ),
        expect=json.dumps(
            {
                "fit_scaling": {
                    w: bs_config.config_hash(STAGES["fit_scaling"].config_slice(config, w)) for w in WORKLOADS
                }
            },
            sort_keys=True,
        ),
    shell:
        "python -m batchscope report --fits {input.fits} --hessian {input.hessian} --expect {params.expect:q}"
        " --edge-of-stability {input.stability} --ghost {input.ghost} --noise {input.noise} --quick {input.quick}"
        " --branch {input.branch}"
        " --benchmarks {params.benchmarks} {params.train_benchmarks} {params.branch_benchmarks}"
        " --notebook {input.notebook}"
        " --out {output.html} --figures {output.figures} > {log} 2>&1"
