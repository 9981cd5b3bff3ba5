// "Copy link" on My files: copies a share link's URL from its read-only field and says so.
// The buttons are rendered hidden and shown here, so that a page without this script has
// no button that does nothing; the field itself is always there to select and copy by hand.

const status = document.getElementById("share-copy-status");
const SHOWN_MS = 2000;

function announce(text) {
  if (!status) {
    return;
  }
  // Emptied first: a second copy in a row is the same text, and must still be read out.
  status.textContent = "";
  window.setTimeout(() => {
    status.textContent = text;
  }, 50);
}

function selectAll(field) {
  field.focus();
  field.select();
  field.setSelectionRange(0, field.value.length);
}

function flash(button) {
  // The visible counterpart of the announcement; the button's own text comes back after a moment.
  button.dataset.copied = "true";
  window.clearTimeout(Number(button.dataset.timer || 0));
  button.dataset.timer = String(
    window.setTimeout(() => {
      delete button.dataset.copied;
    }, SHOWN_MS),
  );
}

async function copy(button) {
  const field = document.getElementById(button.dataset.copy);
  if (!field) {
    return;
  }
  // navigator.clipboard exists only in secure contexts (HTTPS, localhost), and may be refused.
  if (navigator.clipboard?.writeText) {
    try {
      await navigator.clipboard.writeText(field.value);
      flash(button);
      announce("Copied the link.");
      return;
    } catch {
      // refused (permissions, no focus): fall through to selecting the text
    }
  }
  selectAll(field);
  announce("The link is selected: press Ctrl+C (⌘C on a Mac) to copy it.");
}

for (const button of document.querySelectorAll("button.copy-link[data-copy]")) {
  button.hidden = false;
  button.addEventListener("click", () => copy(button));
}
// A click in a link's field selects all of it: a link copied by hand is copied whole.
for (const field of document.querySelectorAll("input.share-url")) {
  field.addEventListener("focus", () => field.select());
}
