// Sluice UI: live updates, nothing else. A live run's page listens to its run's server-sent
// events (states only) and fetches the page's live part again while the run changes (one
// fetch at a time, 250 ms after a change); the newest page of the runs list fetches itself
// again every 3 s while it is visible. Pages work without it.
"use strict";

// A page's fresh HTML from `url`; to the sign-in page when the session is gone (the server
// answers with a redirect there).
function fetchPage(url) {
  return fetch(url, { credentials: "same-origin" }).then((r) => {
    if (r.redirected && new URL(r.url).pathname === "/ui/login") {
      window.location.assign("/ui/login");
      return Promise.reject("signed out");
    }
    return r.ok ? r.text() : Promise.reject(r.status);
  });
}

function replaceFrom(url, id) {
  return fetchPage(url).then((text) => {
    const doc = new DOMParser().parseFromString(text, "text/html");
    const fresh = doc.getElementById(id);
    const here = document.getElementById(id);
    if (fresh && here) here.replaceWith(fresh);
  });
}

function followRun(live) {
  const run = live.dataset.run;
  // One fetch at a time; a change during it fetches once more after it.
  let fetching = false;
  let again = false;
  const refresh = () => {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    again = false;
    setTimeout(() => {
      fetchPage("/ui/runs/" + run + "/live")
        .then((html) => {
          document.getElementById("live").innerHTML = html;
        })
        .catch(() => {})
        .finally(() => {
          fetching = false;
          if (again) refresh();
        });
    }, 250);
  };
  const events = new EventSource("/ui/runs/" + run + "/events");
  events.addEventListener("flow", refresh);
  events.addEventListener("task", refresh);
  events.addEventListener("end", () => {
    events.close();
    refresh();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  // A run that has ended does not change: nothing to follow.
  if (live && live.dataset.run && live.dataset.live === "true") followRun(live);
  const runs = document.getElementById("runs");
  if (runs && runs.dataset.refresh) {
    setInterval(() => {
      if (!document.hidden) replaceFrom(runs.dataset.refresh, "runs").catch(() => {});
    }, 3000);
  }
});
