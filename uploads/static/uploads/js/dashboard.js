// The operations dashboard, live: polls the staff-only JSON endpoint (the page's data-dashboard-url)
// every data-refresh-seconds and swaps in each section the server rendered, with the same templates
// as the page itself, so there is one renderer and the page works unchanged without JavaScript.
//
// Polling rather than a channel-layer group: it works across any number of server processes without
// a message per state change, and a dashboard that missed nothing is simply the next answer.
// While the tab is hidden nothing is fetched; a failed fetch is retried with backoff, and the
// status line (role="status") says so once, not at every refresh.

const root = document.querySelector("[data-dashboard-url]");
const MAX_BACKOFF_SECONDS = 30;

function sectionOf(name) {
  return document.getElementById(`dashboard-${name}`);
}

// Replacing a section must not throw away the keyboard user's place: remember the focused
// element's id (release buttons have stable ids) and focus its successor, if there is one.
function swap(section, html) {
  const focused = document.activeElement;
  const focusedId = focused && section.contains(focused) ? focused.id : "";
  section.innerHTML = html;
  if (focusedId) {
    const again = document.getElementById(focusedId);
    if (again) {
      again.focus();
    }
  }
}

function start(container) {
  const url = container.dataset.dashboardUrl;
  const everyMs = Math.max(1, Number(container.dataset.refreshSeconds) || 2) * 1000;
  const live = document.getElementById("dashboard-live");
  const generated = document.getElementById("dashboard-generated");
  const shown = new Map(); // section name -> the HTML last put in, so unchanged sections stay untouched
  let failures = 0;
  let timer = null;
  let said = "";

  function say(text) {
    if (live && text !== said) {
      live.textContent = text;
      said = text;
    }
  }

  function schedule(delayMs) {
    clearTimeout(timer);
    timer = document.hidden ? null : setTimeout(refresh, delayMs);
  }

  async function refresh() {
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
        redirect: "manual", // a signed-out session is sent to the login page: that is not data
      });
      if (response.type === "opaqueredirect" || response.status === 401 || response.status === 403) {
        say("Live updates stopped: you are signed out or may no longer see this page. Reload to sign in.");
        return; // no point in asking again
      }
      if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      }
      const data = await response.json();
      for (const [name, html] of Object.entries(data.html || {})) {
        const section = sectionOf(name);
        if (section && shown.get(name) !== html) {
          swap(section, html);
          shown.set(name, html);
        }
      }
      if (generated && data.generated_at) {
        const at = new Date(data.generated_at);
        generated.dateTime = data.generated_at;
        generated.textContent = at.toLocaleTimeString();
      }
      failures = 0;
      say(`Updating live, every ${everyMs / 1000} s.`);
      schedule(everyMs);
    } catch (error) {
      failures += 1;
      const backoff = Math.min(MAX_BACKOFF_SECONDS * 1000, everyMs * 2 ** failures);
      say(`Live updates paused (${error.message || error}); retrying in ${Math.round(backoff / 1000)} s.`);
      schedule(backoff);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
    } else {
      schedule(0);
    }
  });
  say(`Updating live, every ${everyMs / 1000} s.`);
  schedule(everyMs);
}

if (root) {
  start(root);
}
