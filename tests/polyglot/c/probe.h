/* Declared for task.c, defined in probe.c: the `probe` mode. */
#ifndef PROBE_H
#define PROBE_H
#include <sluice.h>

/* Each step's result, `{"ok": value}` or `{"err": "text"}`, as a JSON list; never fails. */
sluice_result probe(const sluice_json *steps);

#endif
